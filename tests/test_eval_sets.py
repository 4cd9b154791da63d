"""data.eval_sets (more held-out sets, each logged apart) and bits per byte of the
targets an evaluation scores."""

import json
import math
import os
import shutil

import numpy as np
import pytest
from run_helpers import dummy_prefix_tokenizer, tiny_config

from lrulm import config as config_lib
from lrulm import evaluation, experiment, tasks, train
from lrulm.data import cache as data_cache
from lrulm.data import documents
from lrulm.data import tokenizer as tok


@pytest.fixture(scope="module")
def sets(corpus, tmp_path_factory):
    """Two held-out sets: the run's own eval file under another name, and other text."""
    d = tmp_path_factory.mktemp("sets")
    shutil.copy(corpus["eval"], d / "same.jsonl")
    lines = open(corpus["train"]).readlines()
    (d / "train.jsonl").write_text("".join(lines[4:]))
    (d / "other.jsonl").write_text("".join(lines[:4]))  # not trained on here
    return {"same": str(d / "same.jsonl"), "other": str(d / "other.jsonl"),
            "train": str(d / "train.jsonl")}  # fmt: skip


def _config(corpus, sets, *overrides):
    return tiny_config(
        "train.steps=4", "train.eval_every=2", "checkpoint.every_steps=4",
        "checkpoint.async_save=false", f"data.train_files={sets['train']}",
        f"data.eval_files={corpus['eval']}",
        f"data.eval_sets=same={sets['same']}; other={sets['other']}", *overrides,
    )  # fmt: skip


def test_each_set_is_evaluated_and_logged_apart(tmp_path, corpus, sets, capsys):
    """eval/NAME/... beside eval/...: a set of the eval split's own text gives its numbers;
    other text others; `lrulm eval` gives the same; each set is tokenized once into
    data/eval-NAME."""
    workdir = str(tmp_path / "run")
    config = _config(corpus, sets)
    result = train.train_and_evaluate(config, workdir)
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for row in evals:
        for key in ("loss", "bits_per_byte", "accuracy", "tokens"):
            assert row[f"eval/same/{key}"] == pytest.approx(row[f"eval/{key}"], rel=1e-6)
        assert abs(row["eval/other/loss"] - row["eval/loss"]) > 1e-4
    assert result["loss"] == evals[-1]["eval/loss"]
    assert result["other/loss"] == evals[-1]["eval/other/loss"]
    err = capsys.readouterr().err
    assert "eval at step 4: loss " in err and "eval other at step 4: loss " in err
    assert sorted(f for f in os.listdir(os.path.join(workdir, "data")) if "tokens" in f) == [
        "eval-other.tokens.npy", "eval-same.tokens.npy", "eval.tokens.npy", "train.tokens.npy",
    ]  # fmt: skip
    scored = evaluation.evaluate_workdir(config, workdir)
    for key, value in evals[-1].items():
        if key.startswith("eval/"):
            assert scored[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize(
    "sets_value, message",
    [
        ("code", r"'code' is not NAME=GLOBS"),
        ("x=,", r"'x=,' is not NAME=GLOBS"),
        ("eval=x.txt", r"'eval' cannot name a set"),
        ("a b=x.txt", r"'a b' cannot name a set"),
        ("a=x.txt;a=y.txt", r"names 'a' twice"),
        ("a=/nonexistent/*.txt", r"data.eval_sets a: the glob '/nonexistent/\*.txt' matches"),
    ],
)
def test_malformed_sets_are_refused_before_training(tmp_path, corpus, sets, sets_value, message):
    config = _config(corpus, sets)
    config.data.eval_sets = sets_value
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_set_of_train_text_and_sets_for_lra_are_refused(tmp_path, corpus, sets):
    config = _config(corpus, sets)
    config.data.eval_sets = f"leak={sets['train']}"
    with pytest.raises(ValueError, match="data.eval_sets leak and data.train_files share 1"):
        tasks.make_task(config, str(tmp_path / "run"))
    lra = config_lib.load_with_overrides("configs/lra/listops.py:tiny", [])
    lra.data.eval_sets = f"x={sets['other']}"
    with pytest.raises(ValueError, match="data.eval_sets is for language models"):
        experiment.validate(lra, experiment.make_mesh(lra))
    for section, key, value in (
        ("data", "mixture", "a=x@1;b=y@1"),
        ("train", "eval_by_context", True),
        ("data", "eval_files", "other/*.tsv"),  # ignored before: LRA reads data.data_dir
        ("data", "train_files", "x.jsonl"),
        ("data", "tokenizer", "t.model"),
        ("data", "cache_dir", "/tmp/c"),
        ("data", "vocab_size", 300),
        ("model", "vocab_size", 300),
    ):
        lra = config_lib.load_with_overrides("configs/lra/listops.py:tiny", [])
        lra[section][key] = value
        with pytest.raises(ValueError, match=f"{section}.{key} is for language models"):
            experiment.validate(lra, experiment.make_mesh(lra))


def _target_bytes(sp, targets: np.ndarray) -> int:
    """The UTF-8 bytes the scored targets decode to, document by document (EOS ends one)."""
    total = 0
    for row in targets:
        doc = []
        for t in list(row) + [tok.EOS_ID]:
            if t in (tok.EOS_ID, tok.PAD_ID):
                total += len(sp.decode(doc).encode("utf-8"))
                doc = []
            else:
                doc.append(int(t))
    return total


def test_bits_per_byte_of_a_partial_evaluation_counts_its_own_bytes(lm_workdir):
    """With train.eval_steps > 0 only the first batches are scored: bits per byte divides
    their loss by the bytes their targets decode to, not by the whole split's mean."""
    with open(os.path.join(lm_workdir, "config.json")) as f:
        config = config_lib.from_dict(json.load(f))
    config.train.eval_steps = 1
    task = tasks.make_task(config, lm_workdir, eval_only=True)
    assert task.held_out["eval"].exact_bytes  # lrulm's own tokenizer decodes piece by piece
    result = evaluation.evaluate_workdir(config, lm_workdir)
    rows = config.train.global_batch_size
    stream = np.asarray(task.held_out["eval"].stream.tokens())
    targets = stream[1 : rows * config.train.seq_len + 1].reshape(rows, -1)
    want_bytes = _target_bytes(task.sp, targets)
    mean = task.bytes_per_token("eval") * targets.size
    assert abs(want_bytes - mean) > 0.01 * mean  # the slice is not the split's average
    loss_sum = result["eval/loss"] * result["eval/tokens"]
    want = loss_sum / math.log(2) / want_bytes
    assert result["eval/bits_per_byte"] == pytest.approx(want, rel=1e-5)


def test_a_tokenizer_whose_pieces_do_not_add_up_falls_back_to_the_split_mean(tmp_path):
    """A tokenizer with a dummy prefix (sentencepiece's default) decodes a document
    shorter than its pieces: its piece table is not used."""

    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(300)]
    model = dummy_prefix_tokenizer(tmp_path / "dummy", texts, vocab_size=400)
    own = str(tmp_path / "own.model")
    tok.train_tokenizer(iter(texts), own, vocab_size=400)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
    for path, exact in ((model, False), (own, True)):
        sp = tok.load_tokenizer(path)
        stream = data_cache.prepare_split([str(data)], sp, path, str(tmp_path / "c"), path[-9:-6])
        assert data_cache.counts_bytes_exactly(data_cache.piece_bytes(sp), stream) is exact, path


def test_an_arrayrecord_set_needs_the_tokenizer_it_was_made_with(tmp_path, corpus, sets):
    """An eval set of tools/prepare_data.py shards: refused without data.tokenizer, and
    with another tokenizer than the one its meta.json records; with it, its bits per byte
    use its mean bytes per token while a text split's count its targets' own bytes."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import prepare_data

    texts = list(documents.read_documents(sets["other"]))
    made, other = (str(tmp_path / n) for n in ("made.model", "other.model"))
    sp = tok.train_tokenizer(list(documents.read_documents(sets["train"])), made, vocab_size=512)
    tok.train_tokenizer(texts, other, vocab_size=400)
    prepare_data.write_shards(texts, sp, seq_len=64, output=str(tmp_path / "held"), num_shards=1)
    shards = str(tmp_path / "held-*.arrayrecord")
    for run in "abc":
        (tmp_path / run).mkdir()
    config = _config(corpus, sets, "train.eval_steps=1")
    config.data.eval_sets = f"packed={shards}"
    with pytest.raises(ValueError, match="eval_sets\\) needs the tokenizer it was prepared with"):
        tasks.make_task(config, str(tmp_path / "a"))
    config.data.tokenizer = other
    with pytest.raises(ValueError, match="data.eval_sets packed: .* another tokenizer"):
        tasks.make_task(config, str(tmp_path / "b"))
    config.data.tokenizer = made
    task = tasks.make_task(config, str(tmp_path / "c"))
    assert task.held_out["eval"].exact_bytes and not task.held_out["packed"].exact_bytes
    sums = {"loss": 300.0, "weight": 100.0, "accuracy": 0.0, "bytes": 250.0}
    assert task.finalize(sums, "eval")["bits_per_byte"] == pytest.approx(300 / math.log(2) / 250)
    per_token = task.bytes_per_token("packed")
    assert task.finalize(sums, "packed")["bits_per_byte"] == pytest.approx(
        3.0 / math.log(2) / per_token
    )


@pytest.mark.parametrize("which", ["eval set", "eval split"])
def test_a_split_smaller_than_eval_steps_is_scored_whole(tmp_path, corpus, sets, capsys, which):
    """A held-out split (data.eval_sets' or the run's own) holding fewer batches than
    train.eval_steps (here less than one) is scored whole, padded, every target once, and
    said; a split holding enough is still cut at eval_steps."""
    small = tmp_path / "small.jsonl"
    small.write_text(open(sets["other"]).readline())  # one document
    config = _config(corpus, sets, "train.eval_steps=2")
    if which == "eval set":
        config.data.eval_sets, split, other = f"small={small}", "small", "eval"
    else:
        config.data.eval_files, split, other = str(small), "eval", "same"
    (tmp_path / "run").mkdir()
    task = tasks.make_task(config, str(tmp_path / "run"))
    task.check_eval(config.train.global_batch_size, 2)
    out = capsys.readouterr().out
    assert f"the {which}{' small' * (split == 'small')} holds fewer than train.eval_steps=2" in out
    assert out.count("holds fewer") == 1 and "scores it whole" in out  # only the small one
    stream = task.held_out[split].stream
    kw = dict(global_batch=8, row_offset=0, local_batch=8, num_batches=2)
    batches = list(task.eval_batches(split, **kw))
    targets = np.concatenate([b["targets"] for b in batches])
    assert len(batches) == 1 and int(np.sum(targets != tok.PAD_ID)) == stream.num_tokens - 1
    assert len(list(task.eval_batches(other, **kw))) == 2


def test_byte_fallback_pieces_count_their_bytes(tmp_path):
    """Characters lrulm's tokenizer has no piece for go as byte pieces (one byte each):
    the piece table still adds up to the text's UTF-8 bytes."""
    texts = ["def f(x):\n    return x\n"] * 50 + ["日本語 🙂 ünï\n"]
    sp = tok.train_tokenizer(iter(texts[:50]), str(tmp_path / "t.model"), vocab_size=300)
    table = data_cache.piece_bytes(sp)
    odd = texts[-1]
    ids = sp.encode(odd)
    assert any(sp.is_byte(i) for i in ids)
    assert int(table[ids].sum()) == len(odd.encode("utf-8"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stream = data_cache.prepare_split(
        [str(data)], sp, str(tmp_path / "t.model"), str(tmp_path), "s"
    )
    assert data_cache.counts_bytes_exactly(table, stream)
