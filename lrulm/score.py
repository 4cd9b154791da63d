"""`lrulm score`: the log-likelihood a trained language model gives each of some texts.

Each text is scored as a document at the start of a training row: after an EOS (from a
zero state, with the run's reset after each EOS), every token of it and the EOS that ends
it are targets, with training's own loss code (the vocabulary-blocked loss where the run
used one), so the numbers are those `lrulm train` computes for such a row (a test checks
this against the task's loss). Mid-stream, training's EOS step still holds the previous
document's state, which moves a document's first target slightly. A text of any length is
read in chunks of `chunk` tokens with the recurrent state carried from one to the next, so
memory does not grow with the text: the O(1)-state property of the LRU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrulm import generate
from lrulm.data import tokenizer as tok
from lrulm.model import cross_entropy_and_lse

_ROUND = 128  # chunk lengths are multiples of this: few shapes to compile


def score_texts(
    workdir: str,
    texts: list[str],
    *,
    step: int | None = None,
    batch_size: int = 8,
    chunk: int = 2048,
    weights: str = "auto",
    best: bool = False,
) -> list[dict]:
    """One dict per text, in order: index, tokens (targets scored: the text's tokens and
    its EOS), bytes (UTF-8), logprob (natural log, summed), loss (per token), perplexity,
    bits_per_byte, step (the checkpoint's). weights: as `generate.load_model`'s (the
    weight average of optim.ema where the checkpoint keeps one); best: the best-on-eval
    checkpoint (checkpoint.keep_best) in place of step."""
    if isinstance(texts, str):  # one text, not its characters
        texts = [texts]
    if batch_size < 1 or chunk < 1:
        raise ValueError(f"batch_size and chunk must be positive; got {batch_size}, {chunk}")
    if not texts:
        raise ValueError("no text given; use --text TEXT or --input FILE")
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:  # no bytes: no bits per byte (training reads no empty documents either)
        raise ValueError(f"text {empty[0] + 1} is empty; leave it out")
    model, sp, step = generate.load_model(workdir, step, weights, best=best)
    config = generate.run_config(workdir)
    resets_after = generate.reset_ids(config)
    vocab_block = config.train.get("loss_vocab_block", 0)
    docs = [[tok.EOS_ID, *sp.encode(t), tok.EOS_ID] for t in texts]
    graphdef, params = nnx.split(model)

    @jax.jit
    def chunk_logprob(params, inputs, targets, resets, state):
        m = nnx.merge(graphdef, params)
        x, state = m.features(inputs, resets=resets, h0=state, return_state=True)
        losses, _, _ = cross_entropy_and_lse(
            x, m.head_weight(x.dtype), targets, vocab_block=vocab_block
        )
        return -jnp.sum(jnp.where(targets != tok.PAD_ID, losses, 0.0), -1), state

    logprob = np.zeros(len(docs))
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths together
    width = min(batch_size, len(docs))
    for start in range(0, len(order), width):
        real = order[start : start + width]
        rows = real + [real[0]] * (width - len(real))  # one batch shape throughout
        longest = max(len(docs[i]) - 1 for i in rows)
        size = min(chunk, -(-longest // _ROUND) * _ROUND)
        total = -(-longest // size) * size
        seqs = np.full((width, total + 1), tok.PAD_ID, np.int32)
        for r, i in enumerate(rows):
            seqs[r, : len(docs[i])] = docs[i]
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        resets = np.zeros_like(inputs, bool)
        if resets_after:  # as training: a new document starts after each EOS
            resets[:, 1:] = np.isin(inputs[:, :-1], resets_after)
        state = model.init_state(width)
        sums = np.zeros(width)
        for at in range(0, total, size):
            part = slice(at, at + size)
            got, state = chunk_logprob(
                params, inputs[:, part], targets[:, part], resets[:, part], state
            )
            sums += np.asarray(got, np.float64)
        logprob[real] = sums[: len(real)]
    results = []
    for i, (text, doc) in enumerate(zip(texts, docs)):
        n, num_bytes = len(doc) - 1, len(text.encode("utf-8"))
        loss = -logprob[i] / n
        results.append(
            dict(
                index=i,
                tokens=n,
                bytes=num_bytes,
                logprob=float(logprob[i]),
                loss=float(loss),
                perplexity=math.exp(min(loss, 50.0)),
                bits_per_byte=float(-logprob[i] / math.log(2) / num_bytes),
                step=step,
            )
        )
    return results


def summary(results: list[dict]) -> dict:
    """The texts together: tokens, bytes, loss per token, bits per byte."""
    tokens = sum(r["tokens"] for r in results)
    num_bytes = sum(r["bytes"] for r in results)
    logprob = sum(r["logprob"] for r in results)
    return dict(
        texts=len(results),
        tokens=tokens,
        bytes=num_bytes,
        loss=-logprob / tokens,
        bits_per_byte=-logprob / math.log(2) / num_bytes,
    )
