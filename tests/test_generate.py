"""Recurrent generation: step-by-step decoding equals the parallel model; sampling; errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_helpers import random_prompts, training_view_logits

from lrulm import generate as gen
from lrulm.model import LanguageModel
from lrulm.model_config import from_preset


@pytest.fixture(scope="module")
def model():
    return LanguageModel(from_preset("test", vocab_size=128), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def unscanned_model():
    """Layers as a Python loop (model.scan_layers=False): each takes its own h0."""
    return LanguageModel(from_preset("test", vocab_size=128, scan_layers=False), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("lengths", [[1], [5, 5], [3, 17, 9], [40, 1, 23, 64]])
@pytest.mark.parametrize("scanned", [True, False])
def test_prefill_with_mixed_lengths_matches_each_prompt_alone(request, lengths, scanned):
    model = request.getfixturevalue("model" if scanned else "unscanned_model")
    prompts = random_prompts(lengths, seed=len(lengths))
    logits, states = gen.prefill(model, prompts, chunk_size=16)  # several chunks
    for i, p in enumerate(prompts):
        alone, alone_state = model(jnp.asarray([p]), return_state=True)
        np.testing.assert_allclose(logits[i], alone[0, -1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(states[:, i], alone_state[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch, length", [(1, 12), (3, 30)])
@pytest.mark.parametrize("scanned", [True, False])
def test_step_by_step_equals_parallel_at_every_position(request, batch, length, scanned):
    model = request.getfixturevalue("model" if scanned else "unscanned_model")
    tokens = jnp.asarray(random_prompts([length] * batch, seed=length))
    parallel = model(tokens)
    states = model.init_state(batch)
    step = jax.jit(lambda t, s: model(t, h0=s, return_state=True))
    for t in range(length):
        logits, states = step(tokens[:, t : t + 1], states)
        np.testing.assert_allclose(logits[:, 0], parallel[:, t], rtol=1e-4, atol=1e-4)


def test_greedy_continuation_equals_argmax_of_the_parallel_model(model):
    prompts = random_prompts([7, 3])
    out = gen.generate(model, prompts, max_new_tokens=6, temperature=0.0, stop_ids=())
    for p, new in zip(prompts, out):
        assert len(new) == 6
        seq = list(p)
        for token in new:  # each new token is the argmax of the whole sequence so far
            assert int(jnp.argmax(model(jnp.asarray([seq]))[0, -1])) == token
            seq.append(token)


def test_generation_zeroes_the_state_after_eos_as_training_does(model):
    """EOS inside the prompt, at its end, and drawn while decoding: each new token's
    log-probability equals the whole sequence's under training's resets, and each draw is
    the one those logits give with the same key. Only ids 1-4 can be drawn (EOS is 3), so
    EOS comes often."""
    eos = gen.tok.EOS_ID
    prompts = [[9, 40, eos, 17, 5], [30, 31, eos], [12]]
    seed, steps = 4, 24
    out, logprobs = gen.generate(
        model, prompts, max_new_tokens=steps, temperature=1.0, seed=seed, stop_ids=(),
        num_tokens=5, return_logprobs=True,
    )  # fmt: skip
    real = (jnp.arange(128) < 5) & (jnp.arange(128) != gen.tok.PAD_ID)
    keys = gen.row_keys(jax.random.key(seed), range(len(prompts)))
    for row, (p, new) in enumerate(zip(prompts, out)):
        assert len(new) == steps and eos in new[:-1]  # a drawn EOS is followed by draws
        logits = jnp.where(real, training_view_logits(model, p + new)[len(p) - 1 : -1], -jnp.inf)
        want = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(new)[:, None], 1)
        np.testing.assert_allclose(logprobs[row], want[:, 0], rtol=1e-4, atol=1e-4)
        for i, token in enumerate(new):
            key = jax.random.fold_in(keys[row], i)[None]
            draw = gen.sample_logits(key, logits[i][None], temperature=1.0, top_p=1.0, top_k=0)
            assert int(draw[0]) == token, (row, i)
    # A model trained with data.reset_at_doc_boundaries=False generates without resets.
    (plain,) = gen.generate(
        model, prompts[:1], max_new_tokens=4, temperature=0.0, stop_ids=(), reset_after=()
    )
    seq = list(prompts[0])
    for token in plain:
        assert int(jnp.argmax(model(jnp.asarray([seq]))[0, -1])) == token
        seq.append(token)


def test_stop_tokens_per_sequence_and_seed(model):
    prompts = random_prompts([5, 8, 2])
    a = gen.generate(model, prompts, max_new_tokens=20, temperature=1.0, seed=3, stop_ids=())
    b = gen.generate(model, prompts, max_new_tokens=20, temperature=1.0, seed=3, stop_ids=())
    c = gen.generate(model, prompts, max_new_tokens=20, temperature=1.0, seed=4, stop_ids=())
    assert a == b and a != c
    stop = a[1][4]  # a token the second row produces at position 4
    d = gen.generate(model, prompts, max_new_tokens=20, temperature=1.0, seed=3, stop_ids=(stop,))
    assert d[1] == a[1][: a[1].index(stop)]
    for full, cut in zip(a, d):
        assert cut == full[: len(cut)]


def test_only_the_tokenizers_ids_are_sampled(model):
    """A model vocabulary padded past the tokenizer's: the padded ids are never drawn."""
    prompts = random_prompts([3, 9])
    hot = dict(max_new_tokens=40, temperature=5.0, top_p=1.0, seed=0, stop_ids=())
    free = gen.generate(model, prompts, **hot)
    assert max(max(row) for row in free) >= 50  # without the limit, they would be
    limited = gen.generate(model, prompts, num_tokens=50, **hot)
    assert all(len(row) == 40 and max(row) < 50 for row in limited)


def test_decode_loop_compiles_once(model):
    gen._decode.clear_cache()
    for seed in range(3):
        gen.generate(
            model, random_prompts([4, 6], seed), max_new_tokens=5, temperature=0.7, seed=seed
        )
    assert gen._decode._cache_size() == 1


def test_empty_prompt_and_missing_checkpoint(model, tmp_path):
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate(model, [[]])
    with pytest.raises(ValueError, match="prefill_chunk must be positive"):
        gen.generate(model, [[5]], prefill_chunk=0)
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        gen.generate_from_workdir(str(tmp_path), "x")
    from lrulm import config as config_lib

    (tmp_path / "config.json").write_text(config_lib.base_config().to_json())
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        gen.generate_from_workdir(str(tmp_path), "x")
    with pytest.raises(ValueError, match="--prompt is empty"):
        gen.generate_from_workdir(str(tmp_path), "")


def test_generation_on_a_sharded_model(model):
    """The library function works on parameters sharded over a mesh (fsdp x tensor)."""
    from lrulm import sharding

    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    graphdef, params = nnx.split(model)
    axes = sharding.logical_axes_tree(params)
    pure = nnx.to_pure_dict(params)
    shardings = sharding.tree_shardings(pure, axes, mesh)
    sharded = nnx.merge(graphdef, jax.device_put(pure, shardings))
    lru_b = nnx.to_pure_dict(nnx.state(sharded))["stack"]["blocks"]["lru"]["B_re"]
    assert len(lru_b.sharding.device_set) == 8
    prompts = random_prompts([6, 11])
    want = gen.generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_ids=())
    got = gen.generate(sharded, prompts, max_new_tokens=8, temperature=0.0, stop_ids=())
    assert got == want


def test_batched_samples_from_any_checkpoint(lm_workdir):
    """Several prompts x samples, decoded in batches (the last one filled up), equal each
    prompt's own greedy decoding; --step picks the checkpoint; samples differ by seed."""
    prompts = ["def f(x", "import os\n", "class A:\n    def __init__(self"]
    kwargs = dict(max_new_tokens=12, temperature=0.0, top_p=1.0)
    gen._decode.clear_cache()
    greedy = gen.generate_texts(lm_workdir, prompts, num_samples=2, batch_size=4, **kwargs)
    assert gen._decode._cache_size() == 1  # batches of 4, 2 and 4 rows: one program
    assert [(r["prompt_index"], r["sample"], r["step"]) for r in greedy] == [
        (i, s, 8) for i in range(3) for s in range(2)
    ]
    model, sp, step = gen.load_model(lm_workdir)
    assert step == 8
    for r in greedy:
        (alone,) = gen.generate(model, [sp.encode(r["prompt"])], **kwargs)
        assert r["prompt"] == prompts[r["prompt_index"]]
        assert r["completion"] == sp.decode(sp.encode(r["prompt"]) + alone)[len(r["prompt"]) :]
        whole = gen.generate_from_workdir(lm_workdir, r["prompt"], **kwargs)
        assert whole == r["prompt"] + r["completion"]
    early = gen.generate_texts(lm_workdir, prompts[:1], step=4, **kwargs)
    assert early[0]["step"] == 4
    model4, _, _ = gen.load_model(lm_workdir, step=4)
    (alone,) = gen.generate(model4, [sp.encode(prompts[0])], **kwargs)
    assert early[0]["completion"] == sp.decode(sp.encode(prompts[0]) + alone)[len(prompts[0]) :]
    hot = dict(max_new_tokens=12, temperature=1.5, top_p=1.0)
    a = gen.generate_texts(lm_workdir, prompts[:1], num_samples=3, seed=1, **hot)
    b = gen.generate_texts(lm_workdir, prompts[:1], num_samples=3, seed=1, **hot)
    c = gen.generate_texts(lm_workdir, prompts[:1], num_samples=3, seed=2, **hot)
    texts = [r["completion"] for r in a]
    assert texts == [r["completion"] for r in b] and texts != [r["completion"] for r in c]
    assert len(set(texts)) > 1  # the samples of one prompt are not copies
    # Each sample has its own key: decoded one at a time or with other prompts, the same.
    alone = gen.generate_texts(lm_workdir, prompts[:1], num_samples=3, seed=1, batch_size=1, **hot)
    assert [r["completion"] for r in alone] == texts
    mixed = gen.generate_texts(lm_workdir, prompts, num_samples=3, seed=1, batch_size=5, **hot)
    assert [r["completion"] for r in mixed[:3]] == texts


def test_generate_errors(lm_workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5 .* its steps: 4, 8"):
        gen.generate_texts(lm_workdir, ["x"], step=5)
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        gen.generate_texts(lm_workdir, ["x", ""])
    with pytest.raises(ValueError, match="num_samples must be positive"):
        gen.generate_texts(lm_workdir, ["x"], num_samples=0)
    with pytest.raises(ValueError, match="no prompt given"):
        gen.generate_texts(lm_workdir, [])
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r'prompts.jsonl:2: needs a "prompt"'):
        gen.read_prompts(str(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match="prompts.jsonl:1: not JSON"):
        gen.read_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gen.read_prompts(str(tmp_path / "none.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        gen.read_prompts(str(tmp_path / "blank.txt"))


def test_generate_command_writes_jsonl(lm_workdir, tmp_path, lrulm_here):
    import json
    import subprocess
    import sys

    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "def g(\n"}) + "\n" + json.dumps({"text": "x = [1,"}) + "\n"
    )
    out_file = tmp_path / "samples.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "lrulm", "generate", "--workdir", lm_workdir,
         "--prompt", "import sys", "--prompt_file", str(tmp_path / "p.jsonl"),
         "--num_samples", "2", "--max_new_tokens", "8", "--step", "4",
         "--output", str(out_file)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(r["prompt"], r["sample"], r["step"]) for r in rows] == [
        (p, s, 4) for p in ("import sys", "def g(\n", "x = [1,") for s in range(2)
    ]
    assert out.stdout.count("=== prompt ") == 6 and "=== prompt 3, sample 2 ===" in out.stdout
    for r in rows:
        assert r["prompt"] + r["completion"] in out.stdout
    none = lrulm_here("generate", "--workdir", lm_workdir)
    assert none.returncode == 2 and "give --prompt TEXT" in none.stderr
    for bad in (tmp_path, tmp_path / "missing" / "s.jsonl"):  # refused before generating
        refused = lrulm_here(
            "generate", "--workdir", lm_workdir, "--prompt", "x", "--output", str(bad)
        )
        assert refused.returncode == 2 and "existing, writable directory" in refused.stderr


def test_prefill_compiles_once_for_nearby_prompt_lengths(model):
    gen._prefill_chunk.clear_cache()
    for n in (5, 6, 7, 8):
        gen.prefill(model, random_prompts([n, 2], seed=n))
    assert gen._prefill_chunk._cache_size() == 1


def test_prompt_file_edge_cases(tmp_path):
    bom = tmp_path / "p.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')  # a byte-order mark (Windows editors)
    assert gen.read_prompts(str(bom)) == ["a"]
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\n")
    assert gen.read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        gen.read_prompts(str(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="is a directory"):
        gen.read_prompts(str(tmp_path))


def test_missing_tokenizer_is_not_sent_to_train_a_new_one(lm_workdir, tmp_path):
    import shutil

    shutil.copy(f"{lm_workdir}/config.json", tmp_path / "config.json")
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="copy there the tokenizer this run was trained"):
        gen.load_model(str(tmp_path))


def test_stop_texts_cut_each_completion(lm_workdir):
    """--stop: a completion ends where the first stop text begins (`stopped` names it);
    one without any is whole (`stopped` None); the decoding is the same."""
    from lrulm.main import _unescape

    kw = dict(max_new_tokens=24, temperature=0.0, num_samples=1)
    (whole,) = gen.generate_texts(lm_workdir, ["def f(x"], **kw)
    text = whole["completion"]
    assert len(text) > 8
    stop = text[4:7]
    first = text.find(stop)
    (cut,) = gen.generate_texts(lm_workdir, ["def f(x"], stop=(stop, "\x00never"), **kw)
    assert cut["completion"] == text[:first] and cut["stopped"] == stop
    (none,) = gen.generate_texts(lm_workdir, ["def f(x"], stop=("\x00never",), **kw)
    assert none["completion"] == text and none["stopped"] is None
    assert gen.cut_at_stop("a: b:: c", (":", "::")) == ("a", ":")
    assert gen.cut_at_stop("a b:: c", (":", "::")) == ("a b", "::")  # the longer at one place
    with pytest.raises(ValueError, match="a stop text is empty"):
        gen.generate_texts(lm_workdir, ["x"], stop=("",), **kw)
    assert _unescape("a\\nb\\\\n") == "a\nb\\n"  # as a shell passes '\n' and '\\n'


def test_export_params_writes_the_checkpoints_parameters(lm_workdir, tmp_path):
    """tools/export_params.py: every parameter (not the optimizer state) as a numpy array
    named by its path, equal to the checkpoint's; the step and the resolved model."""
    from lrulm.checkpoint import read_numpy

    out = tmp_path / "params.npz"
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "export_params.py")
    run = lambda *a: subprocess.run(
        [sys.executable, tool, lm_workdir, *a], capture_output=True, text=True, timeout=120
    )
    done = run("--step", "4", "--output", str(out))
    assert done.returncode == 0, done.stderr
    saved = read_numpy(os.path.join(lm_workdir, "checkpoints", "4", "state"))["params"]
    flat = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(saved)[0]
    }
    with np.load(out) as z:
        assert set(z.files) == {*flat, "__step__", "__model__", "__weights__"}
        for name, value in flat.items():
            np.testing.assert_array_equal(z[name], value)
        assert int(z["__step__"]) == 4 and json.loads(str(z["__model__"]))["num_layers"] >= 1
    assert {"stack/blocks/lru/nu_log", "stack/blocks/lru/C_im"} <= set(flat)
    assert f"{len(flat)} arrays" in done.stdout and "step 4" in done.stdout
    missing = run("--best", "--output", str(out))
    assert missing.returncode == 1 and "with checkpoint.keep_best set" in missing.stderr
    assert "its steps: 4, 8" in run("--step", "5", "--output", str(out)).stderr


def test_inspect_checkpoint(lm_workdir, tmp_path):
    import os
    import re
    import shutil
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import inspect_checkpoint

    text = inspect_checkpoint.describe(lm_workdir)
    assert "steps [4, 8]" in text and "step 8 " in text
    assert "data iterator process_0-of-1.json: {'rows': 64, 'global_batch': 8}" in text
    for name in ("nu_log", "theta_log", "gamma_log", "B_re", "C_im", "['embed']['embedding']"):
        assert name in text
    assert "opt_state" not in text and "opt_state" in inspect_checkpoint.describe(
        lm_workdir, 4, show_all=True
    )
    with pytest.raises(ValueError, match="no checkpoint at step 5; there are"):
        inspect_checkpoint.describe(lm_workdir, 5)
    # The step counter is a scalar: named by its group, not a blank.
    assert re.search(r"\n    step +\(\) +int32", text), text
    params = sum(
        int(x.size) for x in jax.tree.leaves(nnx.state(gen.load_model(lm_workdir)[0], nnx.Param))
    )
    assert f"parameters: {params:,} (" in text
    # One checkpoint's directory, or the checkpoints directory, instead of the workdir.
    one = inspect_checkpoint.describe(f"{lm_workdir}/checkpoints/4")
    assert "step 4 " in one and "step 8 " not in one
    assert "step 8 " in inspect_checkpoint.describe(f"{lm_workdir}/checkpoints")
    with pytest.raises(ValueError, match="checkpoint of step 4, not 8"):
        inspect_checkpoint.describe(f"{lm_workdir}/checkpoints/4", 8)
    with pytest.raises(FileNotFoundError, match="is no workdir"):
        inspect_checkpoint.describe(str(tmp_path))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)  # all moved aside as damaged
    (tmp_path / "empty" / "corrupt_checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoints; damaged ones were moved"):
        inspect_checkpoint.describe(str(tmp_path / "empty"))
    shutil.copytree(f"{lm_workdir}/checkpoints/4", tmp_path / "checkpoints" / "4")
    (tmp_path / "checkpoints/4/data/process_0-of-1.json").write_text("{oops")
    assert "process_0-of-1.json: does not read" in inspect_checkpoint.describe(str(tmp_path))
    # A best/ checkpoint's metadata names its metric and value, and no mesh.
    meta = tmp_path / "checkpoints/4/metadata/metadata"
    best = {"step": 4, "lrulm_version": "0.1.0", "best_value": 5.25, "metric": "code/loss"}
    meta.write_text(json.dumps(best))
    text = inspect_checkpoint.describe(str(tmp_path))
    assert "written by lrulm 0.1.0\n  the best eval code/loss so far: 5.25\n" in text, text
    # Damaged metadata is said in its place; a checkpoint moved aside as damaged opens too.
    (tmp_path / "checkpoints/4/metadata/metadata").write_text("{oops")
    text = inspect_checkpoint.describe(str(tmp_path))
    assert "metadata/metadata does not read" in text and "nu_log" in text
    aside = tmp_path / "corrupt_checkpoints" / "4-1796413169"
    shutil.copytree(tmp_path / "checkpoints" / "4", aside)
    text = inspect_checkpoint.describe(str(aside))
    assert "steps ['4-1796413169']" in text and "nu_log" in text


def test_bench_generate_runs(tool_here):
    """tools/bench_generate.py drives prefill and the decode loop directly."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "tools/bench_generate.py", "--preset", "test", "--contexts", "16",
         "--new_tokens", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 16 |" in out.stdout and "| ms/step |" in out.stdout  # a step: --batch tokens
    for args, message in ((("--contexts", ""), "positive prompt lengths"),
                          (("--contexts", "1k"), "comma-separated prompt lengths"),
                          (("--new_tokens", "0"), "--new_tokens must be positive")):  # fmt: skip
        out = tool_here("tools/bench_generate.py", *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_streamed_decoding_gives_the_same_tokens_and_can_stop_early(model):
    """on_tokens: decoding returns every stream_every tokens with the tokens so far
    (growing prefixes of the final ones); the tokens and log-probabilities are those of
    one go, for any stream_every; a true return stops there."""
    prompts = random_prompts([5, 9])
    kw = dict(max_new_tokens=19, temperature=1.0, seed=2, stop_ids=(), return_logprobs=True)
    want, want_lp = gen.generate(model, prompts, **kw)
    for every in (1, 4, 19, 50):
        seen = []
        got, lp = gen.generate(model, prompts, on_tokens=seen.append, stream_every=every, **kw)
        assert got == want, every
        for a, b in zip(lp, want_lp):
            np.testing.assert_allclose(a, b, atol=1e-6)
        assert seen[-1] == want and len(seen) == -(-19 // min(every, 19))
        for prefix in seen:
            assert all(p == w[: len(p)] for p, w in zip(prefix, want))
    # Rows that stop at different chunks (a stop id the second row draws at 5): the same.
    kw_stop = {**kw, "stop_ids": (want[1][5],), "return_logprobs": False}
    plain = gen.generate(model, prompts, **kw_stop)
    assert len(plain[1]) == 5 and len(plain[0]) != 5
    for every in (1, 2, 4):
        streamed = gen.generate(
            model, prompts, on_tokens=lambda t: None, stream_every=every, **kw_stop
        )
        assert streamed == plain, every
    stopped = gen.generate(
        model, prompts, on_tokens=lambda t: len(t[0]) >= 8, stream_every=4, **kw
    )[0]
    assert [len(r) for r in stopped] == [8, 8] and stopped[0] == want[0][:8]


def test_streamed_text_is_the_completion(lm_workdir, capsys, monkeypatch):
    """generate_texts(stream=...) hands out the completion piece by piece: the pieces make
    the completion, cut at a stop text as it is; `lrulm generate --stream` prints it, on
    process 0 only."""
    from lrulm import main as main_lib
    from lrulm import metrics as metrics_lib
    from lrulm.main import main

    # main() sends messages to stderr for the rest of the process: restored after the test.
    monkeypatch.setattr(metrics_lib, "_MESSAGES_TO_STDERR", metrics_lib._MESSAGES_TO_STDERR)

    kw = dict(max_new_tokens=30, temperature=0.9, seed=1, num_samples=1)
    (whole,) = gen.generate_texts(lm_workdir, ["class A"], **kw)
    pieces = []
    (streamed,) = gen.generate_texts(lm_workdir, ["class A"], stream=pieces.append, **kw)
    assert streamed == whole and "".join(pieces) == whole["completion"] and len(pieces) > 1
    stop = whole["completion"][10:13]
    pieces.clear()
    (cut,) = gen.generate_texts(lm_workdir, ["class A"], stream=pieces.append, stop=(stop,), **kw)
    assert (
        "".join(pieces)
        == cut["completion"]
        == whole["completion"][: whole["completion"].find(stop)]
    )
    with pytest.raises(ValueError, match="streaming shows one sample"):
        gen.generate_texts(lm_workdir, ["a", "b"], stream=print, **kw)
    capsys.readouterr()
    args = ["generate", "--workdir", lm_workdir, "--prompt", "class A", "--seed", "1",
            "--max_new_tokens", "30", "--temperature", "0.9"]  # fmt: skip
    assert main([*args, "--stream"]) == 0
    out = capsys.readouterr().out
    assert out == "class A" + whole["completion"] + "\n"
    with pytest.raises(SystemExit):
        main([*args, "--stream", "--num_samples", "2"])
    assert "--stream shows one sample" in capsys.readouterr().err
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    other = main_lib._Streamer("PROMPT")
    other("piece")
    other.finish()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "text, stop",
    [
        ("ab\n@cd", ("\n", "\n@")),  # the longer of two at one place, seen late
        ("xx_BB\n@yy", ("B", "_BB\n@")),  # an earlier, longer one completing after
        ("hello world", ("wor", "lo w")),
        ("no stop at all", ("zz",)),
        ("caf\ufffd\ufffd\u00e9 ok", ()),  # unfinished characters while decoding
        ("a" * 40 + "STOP" + "b" * 10, ("STOP",)),
    ],
)
def test_streamed_pieces_are_the_cut_completion(text, stop):
    """StreamedText fed every prefix of a completion (as decoding grows it) hands out
    exactly cut_at_stop(final text), never a character past the cut, nor an unfinished
    character before the end; it says stop only once no other stop text can change the
    cut (then the rest of the text cannot matter)."""
    want, _ = gen.cut_at_stop(text, stop)
    for step in (1, 3):
        pieces = []
        shown = gen.StreamedText(stop, pieces.append)
        prefixes = [text[:n] for n in range(step, len(text), step)]
        stopped_at = None
        for prefix in prefixes:
            if shown.update(prefix):
                stopped_at = prefix
                break
            assert want.startswith("".join(pieces))
            if prefix.endswith("\ufffd"):  # its bytes may still become a character
                assert not "".join(pieces).endswith("\ufffd")
        shown.update(stopped_at or text, final=True)
        assert "".join(pieces) == want, (step, pieces)
        if stopped_at is not None:
            assert gen.cut_at_stop(stopped_at, stop)[0] == want


def test_samples_of_one_prompt_share_its_prefill(model, monkeypatch):
    """Rows continuing the same prompt are prefilled once (3 distinct of 8 rows: a batch
    of 4); each row's draws are those of its prompt decoded alone with its key."""
    p, q, r = random_prompts([37, 5, 20], seed=9)
    prompts = [p, q, p, p, r, q, p, p]
    widths = []
    original = gen.prefill
    monkeypatch.setattr(
        gen, "prefill", lambda m, b, **kw: widths.append(len(b)) or original(m, b, **kw)
    )
    kw = dict(max_new_tokens=6, temperature=1.0, seed=4, stop_ids=(), return_logprobs=True)
    out, logprobs = gen.generate(model, prompts, **kw)
    assert widths == [4]
    for i, prompt in enumerate(prompts):
        (alone,), (alone_lp,) = gen.generate(model, [prompt], rows=[i], **kw)
        assert alone == out[i], i
        np.testing.assert_allclose(alone_lp, logprobs[i], rtol=1e-5, atol=1e-5)
    widths.clear()
    gen.generate(model, [p, q, r], **kw)  # all distinct: prefilled as given
    assert widths == [3]
