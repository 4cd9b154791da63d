"""`lrulm score`: each text's log-likelihood as training counts it, in chunks of any size."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lrulm import config as config_lib
from lrulm import generate, score, tasks
from lrulm.data import tokenizer as tok

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "import os\n\nprint(os.getcwd())\n" * 12,  # longer than the small chunks below
    " \n",
    "x",
]


def test_scores_are_the_training_loss_of_each_text_as_a_document(lm_workdir):
    """Each text scored as a document of the train stream: after an EOS, its tokens and its
    EOS the targets, the run's resets; the task's loss on that row gives the same sum."""
    results = score.score_texts(lm_workdir, TEXTS, batch_size=3, chunk=2048)
    model, sp, step = generate.load_model(lm_workdir)
    with open(os.path.join(lm_workdir, "config.json")) as f:
        task = tasks.LMTask(config_lib.from_dict(json.load(f)), None, prepare_data=False)
    for text, got in zip(TEXTS, results):
        row = [tok.EOS_ID, *sp.encode(text), tok.EOS_ID]
        batch = {"inputs": jnp.asarray([row[:-1]]), "targets": jnp.asarray([row[1:]])}
        loss_sum, weight, _ = task.loss(model, batch, train=False, key=None)
        assert got["tokens"] == int(weight) == len(row) - 1 and got["step"] == step
        np.testing.assert_allclose(got["logprob"], -float(loss_sum), rtol=1e-5, atol=1e-4)
        assert got["bytes"] == len(text.encode())
        np.testing.assert_allclose(got["loss"], float(loss_sum) / len(row[1:]), rtol=1e-5)


@pytest.mark.parametrize("chunk, batch_size", [(7, 2), (128, 1), (130, 4)])
def test_chunks_and_batches_change_nothing(lm_workdir, chunk, batch_size):
    """The state carried from chunk to chunk: any chunk and batch size, the same scores."""
    want = score.score_texts(lm_workdir, TEXTS, batch_size=8, chunk=4096)
    got = score.score_texts(lm_workdir, TEXTS, batch_size=batch_size, chunk=chunk)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a["logprob"], b["logprob"], rtol=1e-4, atol=1e-3)
    total = score.summary(got)
    assert total["tokens"] == sum(r["tokens"] for r in want)


def test_score_command(lm_workdir, tmp_path):
    """Each row says where its text is from (an empty record is skipped, and said)."""
    corpus = tmp_path / "texts.jsonl"
    records = [json.dumps({"text": t}) for t in (TEXTS[0], "", TEXTS[1])]
    corpus.write_text(records[0] + "\n\n" + records[1] + "\n" + records[2] + "\n")
    out = tmp_path / "scores.jsonl"
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "lrulm", "score", "--workdir", lm_workdir, *a],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    done = run("--input", str(corpus), "--text", "x", "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["source"] for r in rows] == ["--text 1", f"{corpus}:1", f"{corpus}:4"]
    assert f"skipping 1 empty texts ({corpus}:3)" in done.stderr
    # --text first, then the texts of --input, in order.
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["bytes"] for r in rows] == [
        1,
        *(len(t.encode()) for t in TEXTS[:2]),
    ]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert "lrulm score: 3 texts" in done.stderr
    bad = run("--text", "x", "--output", str(tmp_path))
    assert bad.returncode == 2 and "give a file in an existing, writable directory" in bad.stderr
    assert run().returncode == 2
    with pytest.raises(ValueError, match="text 2 is empty; leave it out"):
        score.score_texts(lm_workdir, ["x", ""])
