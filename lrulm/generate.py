"""Recurrent generation: parallel prefill, then O(1)-per-token decoding.

The prompt is run through the model in parallel (the scan), in chunks, carrying each
layer's recurrent state (k, b, n) from chunk to chunk, so prefill memory is bounded by
the chunk and not by the prompt. Decoding runs the same model on one token at a time
from that state: the work and memory per token are independent of the context length,
with no cache that grows. The decode loop is one `lax.while_loop`, compiled once.

Prompts of different lengths share a batch left-padded; a reset at each prompt's first
token zeroes the state the padding produced, so each row is exactly its own prompt. As in
training (`data.reset_at_doc_boundaries`), the state is also zeroed after each EOS, in the
prompt or generated: a new document starts there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import metrics as metrics_lib
from lrulm import tasks
from lrulm.data import documents
from lrulm.data import tokenizer as tok
from lrulm.model import LanguageModel
from lrulm.sampling import (  # noqa: F401 - generate's API: gen.Sampling, gen.sample_logits
    Sampling,
    check_max_new_tokens,
    check_seed,
    penalize_logits,
    row_keys,
    sample_logits,
)


def _left_pad(prompts: list[list[int]], multiple: int, reset_after: tuple[int, ...] = ()):
    """(b, L) left-padded tokens, L a multiple of `multiple`, and (b, L) resets marking
    each prompt's first token and each token that follows one of `reset_after`."""
    longest = max(len(p) for p in prompts)
    length = -(-longest // multiple) * multiple
    tokens = np.full((len(prompts), length), tok.PAD_ID, np.int32)
    resets = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        start = length - len(p)
        tokens[i, start:] = p
        resets[i, start] = True
        resets[i, start + 1 :] |= np.isin(np.asarray(p[:-1], np.int64), reset_after)
    return jnp.asarray(tokens), jnp.asarray(resets)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill_chunk(graphdef, params, tokens, resets, states):
    model = nnx.merge(graphdef, params)
    logits, states = model(tokens, resets=resets, h0=states, return_state=True)
    return logits[:, -1], states


def prefill(
    model: LanguageModel,
    prompts: list[list[int]],
    *,
    chunk_size: int = 2048,
    reset_after: tuple[int, ...] = (tok.EOS_ID,),
):
    """Runs the prompts in parallel chunks, the state zeroed after each token of
    `reset_after`. Returns (last logits (b, v), states (k, b, n))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    # Chunks of a power of two: batches of other lengths reuse the compiled chunk (the
    # left padding costs a little compute, no correctness: the resets drop its state).
    chunk = min(chunk_size, 1 << (longest - 1).bit_length())
    tokens, resets = _left_pad(prompts, chunk, tuple(reset_after))
    graphdef, params = nnx.split(model)
    states = model.init_state(len(prompts))
    logits = None
    for start in range(0, tokens.shape[1], chunk):
        logits, states = _prefill_chunk(
            graphdef,
            params,
            tokens[:, start : start + chunk],
            resets[:, start : start + chunk],
            states,
        )
    return logits, states


def _prefill_once_each(model, prompts, chunk_size, reset_after):
    """`prefill`, each distinct prompt run once (in a batch of the next power of two, so
    few shapes compile) and its state handed to every row that continues it: a recurrent
    state is small, so the samples of one long prompt share its prefill."""
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    if len(distinct) == len(prompts):
        return prefill(model, prompts, chunk_size=chunk_size, reset_after=reset_after)
    width = min(len(prompts), 1 << (len(distinct) - 1).bit_length())
    batch = [list(p) for p in distinct] + [list(distinct[0])] * (width - len(distinct))
    logits, states = prefill(model, batch, chunk_size=chunk_size, reset_after=reset_after)
    where = {p: i for i, p in enumerate(distinct)}
    rows = jnp.asarray([where[tuple(p)] for p in prompts])
    return logits[rows], states[:, rows]


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "steps", "sampling", "num_tokens"),
)
def _decode(
    graphdef,
    params,
    carry,
    keys,
    stop_ids,
    reset_ids,
    max_new_tokens,
    prompt_seen,
    *,
    steps,
    sampling: Sampling,
    num_tokens=None,
):
    """Decodes new tokens i .. min(i + steps, max_new_tokens) - 1 from carry = (i, logits,
    states, done, reset, counts): the (b, steps) tokens and log-probabilities (PAD and 0
    past the end or a row's stop), and the carry to go on from. Token i of row r draws from
    key r folded with i, so any `steps` gives the same tokens. With penalties, counts (b, v)
    holds how often each token was generated and prompt_seen (b, v) the prompt's tokens
    (else both are None)."""
    model = nnx.merge(graphdef, params)
    start, logits = carry[:2]
    b = logits.shape[0]
    vocab = logits.shape[-1]
    # The model's vocabulary may be padded past the tokenizer's (tasks.lm_vocab_size):
    # those rows were never targets, and ids there decode to nothing. Nor is PAD ever a
    # target (the loss weighs it 0), and here it marks a finished row: drawn, it would
    # end the row's text where the model has not stopped.
    ids = jnp.arange(vocab)
    real = (ids < (vocab if num_tokens is None else num_tokens)) & (ids != tok.PAD_ID)
    out = jnp.full((b, steps), tok.PAD_ID, jnp.int32)
    logprobs = jnp.zeros((b, steps), jnp.float32)
    end = jnp.minimum(start + steps, max_new_tokens)

    def cond(loop):
        (i, _, _, done, _, _), _, _ = loop
        return (i < end) & ~jnp.all(done)

    def body(loop):
        (i, logits, states, done, reset, counts), out, logprobs = loop
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        logits = logits.astype(jnp.float32)
        scores = logits
        if sampling.penalised:
            scores = penalize_logits(scores, prompt_seen | (counts > 0), counts, sampling)
        logits = jnp.where(real, logits, -jnp.inf)
        token = sample_logits(
            step_keys,
            jnp.where(real, scores, -jnp.inf),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
        )
        token = jnp.where(done, tok.PAD_ID, token)
        if counts is not None:
            counts = counts.at[jnp.arange(b), token].add((~done).astype(counts.dtype))
        out = out.at[:, i - start].set(token)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        logprobs = logprobs.at[:, i - start].set(jnp.where(done, 0.0, logp))
        done = done | jnp.isin(token, stop_ids)
        # `reset`: the previous token ended a document, so this one starts from zero.
        step_logits, states = model(
            token[:, None], resets=reset[:, None], h0=states, return_state=True
        )
        next_reset = jnp.isin(token, reset_ids)
        return (i + 1, step_logits[:, 0], states, done, next_reset, counts), out, logprobs

    carry, out, logprobs = jax.lax.while_loop(cond, body, (carry, out, logprobs))
    return out, logprobs, carry


def generate(
    model: LanguageModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int = 0,
    key: jax.Array | None = None,
    rows: list[int] | None = None,
    stop_ids: tuple[int, ...] = (tok.EOS_ID,),
    reset_after: tuple[int, ...] = (tok.EOS_ID,),
    prefill_chunk: int = 2048,
    num_tokens: int | None = None,
    return_logprobs: bool = False,
    on_tokens=None,
    stream_every: int = 8,
):
    """Continues each prompt (a list of token ids). Works on a sharded model too: the
    parameters keep their shardings and jit places the computation accordingly.
    Sampling (temperature .. frequency_penalty: `Sampling`) draws among the ids below
    num_tokens (the tokenizer's size; None: the model's whole vocabulary), prompt i from
    `key` (default `jax.random.key(seed)`) folded with rows[i] (default i): the same key
    and row give the same sample in any batch.
    After each token of `reset_after` (in the prompt or generated) the recurrent state
    is zeroed, as training does at document ends; () for a model trained without
    (`data.reset_at_doc_boundaries=False`).

    With `on_tokens`, decoding returns to the host every `stream_every` tokens and calls
    on_tokens(new tokens so far, per prompt, up to its stop) to show them as they come;
    a true return value stops decoding there (e.g. a stop text seen). The tokens are
    those of decoding in one go.

    Returns, per prompt, the new tokens up to and excluding the first stop token; with
    return_logprobs, also (per prompt) each new token's log-probability under the model
    (at temperature 1, without penalties, among the ids that can be drawn), as a second list.
    """
    sampling = Sampling(
        temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty
    )
    check_max_new_tokens(max_new_tokens)
    if key is None:
        check_seed(seed)
    if stream_every < 1:
        raise ValueError(f"stream_every must be positive; got {stream_every}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be positive; got {prefill_chunk}")
    if model.cfg.bidirectional:
        raise ValueError("a bidirectional model cannot generate: it needs the future")
    reset_after = tuple(reset_after)
    logits, states = _prefill_once_each(model, prompts, prefill_chunk, reset_after)
    graphdef, params = nnx.split(model)
    resets = jnp.asarray(reset_after, jnp.int32)
    b = len(prompts)
    prompt_seen = counts = None
    if sampling.penalised:  # the tokens seen so far, per row: the prompt's, then generated
        seen = np.zeros((b, logits.shape[-1]), bool)
        for row, p in enumerate(prompts):
            seen[row, np.asarray(p)] = True
        prompt_seen = jnp.asarray(seen)
        counts = jnp.zeros((b, logits.shape[-1]), jnp.int32)
    carry = (
        jnp.int32(0),
        logits,
        states,
        jnp.zeros((b,), bool),
        jnp.isin(jnp.asarray([p[-1] for p in prompts]), resets),  # the prompt ended a document
        counts,
    )
    keys = row_keys(
        jax.random.key(seed) if key is None else key, range(b) if rows is None else rows
    )
    decode = functools.partial(
        _decode,
        graphdef,
        params,
        keys=keys,
        stop_ids=jnp.asarray(stop_ids, jnp.int32),
        reset_ids=resets,
        max_new_tokens=jnp.int32(max_new_tokens),
        prompt_seen=prompt_seen,
        steps=max_new_tokens if on_tokens is None else min(stream_every, max_new_tokens),
        sampling=sampling,
        num_tokens=num_tokens,
    )
    outs, logprob_parts = [], []
    while True:
        out, logprobs, carry = decode(carry)
        outs.append(np.asarray(out))
        logprob_parts.append(np.asarray(logprobs))
        i, done = int(carry[0]), bool(np.all(np.asarray(carry[3])))
        result = [_until_stop(row, stop_ids) for row in np.concatenate(outs, axis=1)[:, :i]]
        if on_tokens is None or i >= max_new_tokens or done or on_tokens(result):
            break
    if on_tokens is not None and (i >= max_new_tokens or done):
        on_tokens(result)  # the last tokens
    if return_logprobs:
        logprobs = np.concatenate(logprob_parts, axis=1)
        return result, [lp[: len(ids)].tolist() for lp, ids in zip(logprobs, result)]
    return result


def _until_stop(row, stop_ids) -> list[int]:
    ids = []
    for t in row.tolist():
        if t in stop_ids or t == tok.PAD_ID:
            break
        ids.append(t)
    return ids


def run_config(workdir: str):
    """The config a workdir's run was trained with (its config.json)."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json)")
    with open(config_path) as f:
        return config_lib.from_dict(json.load(f))


def reset_ids(config) -> tuple[int, ...]:
    """The tokens after which the run's model zeroes its state (`generate`'s reset_after)."""
    return (tok.EOS_ID,) if config.data.reset_at_doc_boundaries else ()


def load_model(workdir: str, step: int | None = None, weights: str = "auto", *, best: bool = False):
    """(model with the parameters of checkpoint `step` (None: the newest), tokenizer, step)
    of a workdir. weights: "auto" (the weight average of optim.ema where the checkpoint
    keeps one, else the trained weights), "ema" or "raw" (checkpoint.weights_key). best:
    the best-on-eval checkpoint the run keeps (checkpoint.keep_best) in place of step."""
    config = run_config(workdir)
    if config.task != "lm":
        raise ValueError(
            f"{workdir} trained task {config.task!r}; generating and scoring text needs a "
            "language model"
        )
    saved, steps = best_lib.steps_to_read(workdir, step, best)
    checkpoints = os.path.join(saved, "checkpoints")
    sp_path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(sp_path):
        # A tokenizer trained now would not number pieces as the embeddings do.
        given = f" (data.tokenizer={config.data.tokenizer})" if config.data.tokenizer else ""
        raise FileNotFoundError(
            f"no tokenizer at {sp_path}; copy there the tokenizer this run was trained "
            f"with{given}: a new one would not match the model's embeddings"
        )
    sp = tok.load_tokenizer(sp_path)
    vocab = tasks.lm_vocab_size(sp, config.model.vocab_size)
    model_cfg = tasks.resolve_model_config(config.model, vocab_size=vocab)
    abstract = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    # One of this process's own devices: every process of a multi-process run decodes
    # the same samples on its own (process 0 prints them).
    replicated = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        nnx.to_pure_dict(abstract_params),
    )
    errors = []
    for candidate in [step] if step is not None else reversed(steps):
        try:
            params, _, _ = ckpt_lib.restore_params(
                os.path.join(checkpoints, str(candidate)), target, weights
            )
            return nnx.merge(graphdef, params), sp, candidate
        except (ckpt_lib.CheckpointMismatch, ckpt_lib.NoWeightAverage):
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint: try the one before
            if best:  # its only checkpoint
                raise ValueError(best_lib.best_damaged(checkpoints, candidate, e)) from None
            errors.append(f"step {candidate}: {metrics_lib.brief(e)}")
            if step is None:
                metrics_lib.say(
                    f"lrulm: checkpoint {candidate} does not read ({metrics_lib.brief(e)}); "
                    "trying the one before"
                )
    raise ValueError(f"no checkpoint in {checkpoints} reads back:\n  " + "\n  ".join(errors))


def read_prompts(path: str) -> list[str]:
    """`--prompt_file`: JSON lines (.jsonl, .json, .ndjson, .jsonlines) with a "prompt"
    (or "text") field, one prompt per line; any other file: each non-empty line is a prompt."""
    if os.path.isdir(path):
        raise ValueError(f"--prompt_file {path} is a directory; give a file of prompts")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompt_file {path} does not exist")
    prompts = []
    # utf-8-sig: editors on Windows start files with a byte-order mark, not part of a prompt.
    with open(path, encoding="utf-8-sig") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt_file {path} is not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if not path.lower().endswith(documents.JSON_SUFFIXES):
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e}); one object per line") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f'{path}:{n}: needs a "prompt" (or "text") string field')
        prompts.append(text)
    if not prompts:
        raise ValueError(f"--prompt_file {path} holds no prompts")
    return prompts


def generate_texts(
    workdir: str,
    prompts: list[str],
    *,
    num_samples: int = 1,
    step: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int = 0,
    stop: tuple[str, ...] = (),
    weights: str = "auto",
    best: bool = False,
    stream=None,
) -> list[dict]:
    """`lrulm generate`: num_samples continuations of each prompt from checkpoint `step`
    (None: the newest; best: the best-on-eval one, checkpoint.keep_best's), decoded
    batch_size rows at a time, with its weight average
    (optim.ema) where it keeps one (weights: "auto", "ema", "raw": `load_model`), drawn
    as `Sampling` says (temperature .. frequency_penalty).

    prompts: a list of texts (a str: one prompt); stop: texts (a str: one).

    Returns one dict per sample, prompt by prompt: prompt, completion (the new text only),
    prompt_index, sample, step, sampling (the settings that drew it: `Sampling`'s, seed,
    max_new_tokens, weights, best, stop); with `stop` texts, each completion is cut where the first
    of them begins, and `stopped` names it (None where none occurs; decoding itself runs to
    EOS or max_new_tokens). The same arguments give the same texts (of the same checkpoint:
    best names the best one at the time); each sample draws
    from its own key, so batch_size changes none on CPU (on an accelerator, the logits of
    other batch shapes may differ in their last bits, which can change a rare draw).
    With `stream` (one prompt, one sample), stream(text) is called with each new piece of
    the completion as it is decoded (up to a stop text; the same text in the end).
    """
    if isinstance(prompts, str):  # one prompt, not its characters
        prompts = [prompts]
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    sampling = Sampling(
        temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty
    )
    check_max_new_tokens(max_new_tokens)
    check_seed(seed)
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive; got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if not prompts:
        raise ValueError("no prompt given; use --prompt TEXT or --prompt_file FILE")
    if any(not text for text in stop):
        raise ValueError("a stop text is empty; give --stop TEXT with some text")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i + 1} is empty; give some text to continue")
    if stream is not None and len(prompts) * num_samples != 1:
        raise ValueError("streaming shows one sample: give one prompt and num_samples 1")
    model, sp, step = load_model(workdir, step, weights, best=best)
    reset_after = reset_ids(run_config(workdir))
    encoded = [sp.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i + 1} ({prompts[i]!r}) encodes to no tokens")
    settings = {**dataclasses.asdict(sampling), "seed": seed, "max_new_tokens": max_new_tokens,
                "weights": weights, "best": best, "stop": list(stop)}  # fmt: skip
    rows = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
    width = min(batch_size, len(rows))
    results = [None] * len(rows)
    # Batches of similar prompt lengths: less left padding to prefill.
    order = sorted(range(len(rows)), key=lambda k: len(encoded[rows[k][0]]))
    for start in range(0, len(order), width):
        # Each sample draws from its own key (its index among all samples): the texts do
        # not depend on batch_size or on which samples share a batch. The last batch is
        # filled up with its first row, so every batch has one shape and the decode loop
        # compiles once.
        index = order[start : start + width]
        batch = [rows[k] for k in index]
        ids = [encoded[i] for i, _ in batch] + [encoded[batch[0][0]]] * (width - len(batch))
        index = index + [index[0]] * (width - len(batch))
        shown = StreamedText(stop, stream) if stream is not None else None

        def show(tokens, final=False, shown=shown):  # the one sample's completion so far
            return shown.update(_completion(sp, encoded[0], tokens[0]), final)

        new = generate(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            **dataclasses.asdict(sampling),
            seed=seed,
            rows=index,
            reset_after=reset_after,
            num_tokens=sp.get_piece_size(),
            on_tokens=None if stream is None else show,
        )
        if stream is not None:
            show(new, final=True)
        for k, (i, s), tokens in zip(index, batch, new):
            completion = _completion(sp, encoded[i], tokens)
            sample = dict(prompt=prompts[i], completion=completion, prompt_index=i, sample=s)
            if stop:
                sample["completion"], sample["stopped"] = cut_at_stop(completion, stop)
            results[k] = {**sample, "step": step, "sampling": settings}
    return results


class StreamedText:
    """Hands out a growing completion piece by piece (`emit`), as `cut_at_stop` will cut
    the final one: held back are the characters a stop text may begin with, bytes of an
    unfinished character (U+FFFD), and a stop text found while a longer one that starts
    no later may still complete."""

    def __init__(self, stop: tuple[str, ...], emit):
        self.stop, self.emit, self.shown = stop, emit, 0
        self.longest = max(map(len, stop), default=0)

    def update(self, text: str, final: bool = False) -> bool:
        """Shows what of `text` (the completion so far) is settled; True once a stop text
        ends it for good (decoding may stop)."""
        cut, which = cut_at_stop(text, self.stop)
        # Settled: no stop text starting at or before the cut can still complete.
        settled = final or (which is not None and len(cut) + self.longest <= len(text))
        safe = len(cut) if settled else min(len(cut), len(text) - max(self.longest - 1, 0))
        while safe > self.shown and not final and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > self.shown:
            self.emit(text[self.shown : safe])
            self.shown = safe
        return settled and which is not None


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    """text up to where the first of the stop texts begins, and that stop text (None, and
    the whole text, where none occurs). Of two starting at one place, the longer."""
    found = [(text.find(s), -len(s), s) for s in stop if s in text]
    if not found:
        return text, None
    at, _, which = min(found)
    return text[:at], which


def _completion(sp, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text new_ids add after the prompt. Decoded with the prompt, since a tokenizer
    may drop a leading space when it decodes new_ids alone (add_dummy_prefix)."""
    prompt, whole = sp.decode(prompt_ids), sp.decode(prompt_ids + new_ids)
    return whole[len(prompt) :] if whole.startswith(prompt) else sp.decode(new_ids)


def generate_from_workdir(workdir: str, prompt: str, **kwargs) -> str:
    """The prompt followed by one continuation, as text (keyword arguments as
    `generate_texts`)."""
    if not prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    (result,) = generate_texts(workdir, [prompt], num_samples=1, **kwargs)
    return result["prompt"] + result["completion"]
