"""data.text_field (and --text_field): JSON lines whose text is under another field, as
in The Stack's "content"; read for the tokenizer, the splits, scoring and sharding."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import tiny_config

from lrulm import train
from lrulm.data import cache as data_cache
from lrulm.data import lm as lm_data
from lrulm.data import tokenizer as tok


@pytest.fixture(scope="module")
def content(corpus, tmp_path_factory):
    """The test corpus with its text under "content", and a short "text" beside it."""
    d = tmp_path_factory.mktemp("content")
    out = {}
    for split in ("train", "eval"):
        with open(corpus[split]) as f, open(d / f"{split}.jsonl", "w") as g:
            for line in f:
                text = json.loads(line)["text"]
                g.write(json.dumps({"path": "x.py", "content": text, "text": "# ok\n"}) + "\n")
        out[split] = str(d / f"{split}.jsonl")
    return out


def _config(content, *overrides):
    return tiny_config(
        "train.steps=2", "train.eval_every=2", "checkpoint.every_steps=2",
        "checkpoint.async_save=false", f"data.train_files={content['train']}",
        f"data.eval_files={content['eval']}", *overrides,
    )  # fmt: skip


def test_a_run_reads_the_field_it_is_given(tmp_path, corpus, content):
    """With data.text_field=content, the tokenizer and the splits are the "content" texts:
    the same tokens as the plain corpus's "text" (the short "text" field is not read); the
    tokenizer a run made for one field is trained again for another (no checkpoint)."""
    run = tmp_path / "run"
    train.train_and_evaluate(_config(content, "data.text_field=content"), str(run))
    sp = tok.load_tokenizer(str(run / "tokenizer.model"))
    stream = data_cache.prepare_split(
        [corpus["eval"]], sp, str(run / "tokenizer.model"), str(tmp_path / "plain"), "eval"
    )
    ours = np.load(run / "data" / "eval.tokens.npy")
    np.testing.assert_array_equal(ours, stream.tokens())
    assert json.loads((run / "tokenizer.json").read_text())["text_field"] == "content"
    # The same files read by their "text" field are other text: tokenized anew.
    short = data_cache.prepare_split(
        [content["eval"]], sp, str(run / "tokenizer.model"), str(run / "data"), "eval"
    )
    assert short.num_tokens < 100 < stream.num_tokens
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "tokenizer.model").write_bytes((run / "tokenizer.model").read_bytes())
    (fresh / "tokenizer.json").write_bytes((run / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="fewer than one sequence"):  # "# ok" is short
        train.train_and_evaluate(_config(content), str(fresh))
    assert "text_field" not in json.loads((fresh / "tokenizer.json").read_text())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.text_field=body"], r"'body' string field per line .*its fields: path, content"),
        (["data.text_field= "], "data.text_field names the JSON lines' field"),
    ],
)
def test_a_missing_or_empty_field_is_refused(tmp_path, content, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(_config(content, *overrides), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_lra_refuses_a_text_field(tmp_path):
    from lrulm import config as config_lib

    config = config_lib.load_with_overrides(
        "configs/lra/listops.py:tiny", [("data.text_field", "content")]
    )
    with pytest.raises(ValueError, match="data.text_field is for language models"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_the_commands_take_text_field(tmp_path, content, lm_workdir, lrulm_here):
    """`lrulm tokenizer train`, `lrulm score --input` and tools/prepare_data.py read the
    field --text_field names; an empty one is refused."""
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, *a], capture_output=True, text=True, timeout=300
    )
    model = tmp_path / "t.model"
    out = run("-m", "lrulm", "tokenizer", "train", "--input", content["train"],
              "--output", str(model), "--vocab_size", "400", "--text_field", "content")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    sp = tok.load_tokenizer(str(model))
    assert sp.get_piece_size() == 400  # "# ok" alone could not make 400 pieces
    scored = run("-m", "lrulm", "score", "--workdir", lm_workdir, "--input", content["eval"],
                 "--text_field", "content")  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    rows = [json.loads(line) for line in scored.stdout.splitlines()]
    assert len(rows) == 4 and min(r["tokens"] for r in rows) > 100
    shards = run("tools/prepare_data.py", "--input", content["eval"], "--tokenizer", str(model),
                 "--seq_len", "64", "--output", str(tmp_path / "sh" / "eval"),
                 "--num_shards", "1", "--text_field", "content")  # fmt: skip
    assert shards.returncode == 0, shards.stderr[-2000:]
    meta = json.load(open(lm_data.shards_meta_path(str(tmp_path / "sh" / "eval"))))
    want = sum(len(json.loads(x)["content"].encode()) for x in open(content["eval"]))
    assert meta["bytes"] == want
    empty = lrulm_here("score", "--workdir", lm_workdir, "--input", content["eval"],
                       "--text_field", "")  # fmt: skip
    assert empty.returncode == 2 and "--text_field names the JSON field" in empty.stderr


def test_score_reads_the_field_the_run_read(tmp_path, content, lm_workdir):
    """Without --text_field, `lrulm score --input` reads the run's data.text_field."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lm_workdir, run)
    recorded = json.loads((run / "config.json").read_text())
    recorded["data"]["text_field"] = "content"
    (run / "config.json").write_text(json.dumps(recorded))
    out = subprocess.run(
        [sys.executable, "-m", "lrulm", "score", "--workdir", str(run), "--input", content["eval"]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert min(json.loads(line)["tokens"] for line in out.stdout.splitlines()) > 100
