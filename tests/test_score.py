"""`lrulm score`: each text's log-likelihood as training counts it, in chunks of any size."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
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
    (one,) = score.score_texts(lm_workdir, TEXTS[0])  # a str is one text, not its characters
    assert one["tokens"] == results[0]["tokens"]


@pytest.mark.parametrize("chunk, batch_size", [(7, 2), (128, 1), (130, 4)])
def test_chunks_and_batches_change_nothing(lm_workdir, chunk, batch_size):
    """The state carried from chunk to chunk: any chunk and batch size, the same scores."""
    want = score.score_texts(lm_workdir, TEXTS, batch_size=8, chunk=4096)
    got = score.score_texts(lm_workdir, TEXTS, batch_size=batch_size, chunk=chunk)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a["logprob"], b["logprob"], rtol=1e-4, atol=1e-3)
    total = score.summary(got)
    assert total["tokens"] == sum(r["tokens"] for r in want)


def test_score_command(lm_workdir, tmp_path, lrulm_here):
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
    here = lambda *a: lrulm_here("score", "--workdir", lm_workdir, *a)  # noqa: E731
    bad = here("--text", "x", "--output", str(tmp_path))
    assert bad.returncode == 2 and "give a file in an existing, writable directory" in bad.stderr
    assert here().returncode == 2
    with pytest.raises(ValueError, match="text 2 is empty; leave it out"):
        score.score_texts(lm_workdir, ["x", ""])


def test_the_figures_of_each_text_and_of_all_follow_from_the_log_likelihood(lm_workdir):
    """bytes are UTF-8 bytes (not characters); bits per byte, perplexity and the summary's
    loss and bits per byte follow from the summed log-likelihoods, tokens and bytes."""
    texts = ["café ☕ ünï\n", TEXTS[0], "x"]
    results = score.score_texts(lm_workdir, texts, batch_size=3, chunk=256)
    for text, got in zip(texts, results):
        assert got["bytes"] == len(text.encode("utf-8"))
        want_bpb = -got["logprob"] / math.log(2) / got["bytes"]
        assert got["bits_per_byte"] == pytest.approx(want_bpb, rel=1e-9)
        assert got["loss"] == pytest.approx(-got["logprob"] / got["tokens"], rel=1e-9)
        assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
    assert results[0]["bytes"] > len(texts[0])  # the test means something: not ASCII
    total = score.summary(results)
    tokens, num_bytes = sum(r["tokens"] for r in results), sum(r["bytes"] for r in results)
    logprob = sum(r["logprob"] for r in results)
    assert (total["texts"], total["tokens"], total["bytes"]) == (3, tokens, num_bytes)
    assert total["loss"] == pytest.approx(-logprob / tokens, rel=1e-9)
    assert total["bits_per_byte"] == pytest.approx(-logprob / math.log(2) / num_bytes, rel=1e-9)
    # Weighted by tokens and bytes, not the mean of the texts' figures.
    assert total["loss"] != pytest.approx(np.mean([r["loss"] for r in results]), rel=1e-3)


def test_a_model_sure_of_the_wrong_tokens_gets_a_capped_perplexity(lm_workdir, monkeypatch):
    """A loss past ~709 nats a token would overflow exp(): perplexity stops at exp(50),
    while the loss, log-likelihood and bits per byte stay exact."""
    load = generate.load_model

    def overconfident(*args, **kwargs):  # logits x1000: confidently wrong almost everywhere
        model, sp, step = load(*args, **kwargs)
        model.embed.embedding[...] = model.embed.embedding[...] * 1000.0
        return model, sp, step

    monkeypatch.setattr(generate, "load_model", overconfident)
    (got,) = score.score_texts(lm_workdir, [TEXTS[1]])
    assert math.isfinite(got["loss"]) and got["loss"] > 709  # exp() of it would overflow
    assert got["perplexity"] == math.exp(50.0)
    assert got["bits_per_byte"] == pytest.approx(-got["logprob"] / math.log(2) / got["bytes"])


def _logprob(model, row, resets):
    """The summed log-probability of row[1:] after row[:-1] under the model's logits."""
    tokens = jnp.asarray([row[:-1]])
    logits = model(tokens, resets=jnp.asarray([resets]))[0]
    logprobs = jnp.take_along_axis(logits, jnp.asarray(row[1:])[:, None], -1)[:, 0]
    return float(jnp.sum(logprobs - jax.nn.logsumexp(logits, -1)))


def test_a_run_without_document_resets_is_scored_without_them(lm_workdir, tmp_path):
    """data.reset_at_doc_boundaries=False: the model never had its state zeroed after an
    EOS, so the EOS a scored text follows stays in the state of its first token. (A text
    itself encodes no EOS, and generation stops at one, so that leading EOS is where the
    setting shows in scoring.)"""
    run = str(tmp_path / "run")
    shutil.copytree(lm_workdir, run)
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    saved["data"]["reset_at_doc_boundaries"] = False
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(saved, f)
    assert generate.reset_ids(generate.run_config(run)) == ()
    assert generate.reset_ids(generate.run_config(lm_workdir)) == (tok.EOS_ID,)
    model, sp, _ = generate.load_model(run)
    text = TEXTS[0]
    row = [tok.EOS_ID, *sp.encode(text), tok.EOS_ID]
    none = [False] * (len(row) - 1)
    after_eos = [False, True] + none[2:]
    (got,) = score.score_texts(run, [text], chunk=7)  # the state carried across chunks
    np.testing.assert_allclose(got["logprob"], _logprob(model, row, none), rtol=1e-5, atol=1e-4)
    (reset,) = score.score_texts(lm_workdir, [text], chunk=7)
    np.testing.assert_allclose(
        reset["logprob"], _logprob(model, row, after_eos), rtol=1e-5, atol=1e-4
    )
    assert abs(got["logprob"] - reset["logprob"]) > 1e-3  # the setting changes the scores
