"""What is learnt: the model a task builds, its loss and metrics, and its batches.

Two tasks share one trainer: language modelling ("lm") and LRA classification (the
task names of lrulm.data.lra.TASKS). Each provides

  model_config                 the resolved ModelConfig
  make_model(rngs)             the nnx model
  batch_spec()                 {name: (global shape, dtype)} of one global batch
  loss(model, batch, ...)      (sum of losses, sum of weights, {metric: sum})
  finalize(sums)               eval metrics from summed statistics
  train_batches(...)           this process's share of each global training batch
  eval_batches(split, ...)     the same for the held-out split "eval" (and "test")
  best_metric                  None, or (metric, "max"|"min"): the checkpoint the task
                               keeps by default (LRA: the best on "eval", "test" reported
                               with it); `best_metric(config)` is the run's, with
                               checkpoint.keep_best
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from lrulm import distributed, workdir_tokenizer
from lrulm import metrics as metrics_lib
from lrulm import model_config as mc
from lrulm.data import cache as data_cache
from lrulm.data import documents
from lrulm.data import lm as lm_data
from lrulm.data import tokenizer as tok
from lrulm.model import LanguageModel, cross_entropy_and_lse


def resolve_model_config(model_cfg, **forced) -> mc.ModelConfig:
    """ModelConfig from config.model: the preset, then the fields set in the config, then
    `forced` (values the data dictates, e.g. the vocabulary size)."""
    fields = {k: v for k, v in model_cfg.items() if k != "preset" and v is not None}
    fields.update({k: v for k, v in forced.items() if v is not None})
    return mc.from_preset(model_cfg.preset, **fields)


def lm_vocab_size(sp, configured: int | None) -> int:
    """The model's vocabulary for a tokenizer: the configured size, or the tokenizer's
    padded to a multiple of 128 (MXU / tensor-core friendly, divisible by any tensor
    axis; the extra rows are never targets)."""
    needed = sp.get_piece_size()
    if configured is not None and configured < needed:
        raise ValueError(f"model.vocab_size={configured} is smaller than the tokenizer's {needed}")
    return configured or -(-needed // 128) * 128


def vocab_note(config) -> str:
    """What `lrulm config` and `compile` (no data read: the model's vocabulary is
    model.vocab_size, else the preset's) say where a run of `config` would have another:
    its tokenizer's pieces (data.tokenizer's, or at most data.vocab_size for one trained
    into the workdir) padded to a multiple of 128; "" where they agree."""
    if config.task != "lm" or config.model.get("vocab_size") is not None:
        return ""
    path = config.data.get("tokenizer", "")
    if path and os.path.isfile(path):
        pieces, source = tok.from_model_bytes(tok.model_bytes(path)[0]).get_piece_size(), path
    elif path:
        return ""  # not there: the run says so
    else:
        pieces, source = config.data.vocab_size, f"data.vocab_size={config.data.vocab_size}"
    planned = -(-pieces // 128) * 128
    preset = resolve_model_config(config.model).vocab_size
    if planned == preset:
        return ""
    return (
        f"lrulm: note: the model here has the preset's vocabulary ({preset:,}); a run's is its "
        f"tokenizer's pieces padded to 128 ({source}: {planned:,}{' at most' * (not path)}): "
        f"add --config.model.vocab_size={planned} to see that one"
    )


def write_atomic(path: str, text: str) -> None:
    """text written to path whole or not at all (a crash mid-write leaves path as it was)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _short(path: str) -> str:
    """A file's path as said to the user: from the working directory where it is below
    it, else whole (a file name alone is ambiguous: every package has an __init__.py)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


@dataclasses.dataclass
class HeldOut:
    """A held-out split of a language model: its packed sequences (`source`: whole ones;
    `source_all`: with the tail, for a full pass), its UTF-8 bytes per token over the
    whole split (None: not known), its token stream (None: ArrayRecord shards), and
    whether the tokenizer's piece table counts its bytes exactly (`LMTask.finalize`)."""

    files: list
    source: object
    source_all: object
    bytes_per_token: float | None
    stream: data_cache.TokenStream | None = None
    exact_bytes: bool = False


def metric_prefix(split: str) -> str:
    """Where a split's metrics are logged: eval/, test/, or eval/NAME/ for data.eval_sets."""
    return split if split in ("eval", "test") else f"eval/{split}"


def context_lengths(resets, shape) -> jax.Array:
    """(b, l) int: the input tokens the prediction at each position has seen, from the
    row's start or the last document start (`resets`: None when the state is never reset)."""
    pos = jnp.arange(shape[1], dtype=jnp.int32)[None, :]
    if resets is None:
        return jnp.broadcast_to(pos + 1, shape)
    start = jax.lax.cummax(jnp.where(resets, pos, 0), axis=1)
    return pos - start + 1


def _by_context(losses, weights, resets) -> dict:
    """Summed loss and scored targets by context length in powers of two: loss_ctxN and
    tokens_ctxN over the predictions that saw N to 2N - 1 tokens (train.eval_by_context)."""
    ctx = context_lengths(resets, losses.shape)
    bucket = 31 - jax.lax.clz(ctx)  # floor(log2(ctx)), exactly
    out = {}
    for k in range(int(math.log2(losses.shape[1])) + 1):
        mask = weights * (bucket == k)
        out[f"loss_ctx{2**k}"] = jnp.sum(losses * mask)
        out[f"tokens_ctx{2**k}"] = jnp.sum(mask)
    return out


class LMTask:
    """Next-token prediction on packed text."""

    name = "lm"
    best_metric = None  # by default language models report the last evaluation

    def __init__(
        self, config, workdir: str | None, *, prepare_data: bool = True, eval_only: bool = False
    ):
        """eval_only (`lrulm eval`): only the held-out split is prepared (data.eval_files, or
        the run's own held-out files), with the tokenizer the run trained with; nothing
        of the train split is read or tokenized, and the workdir's tokenizer is kept."""
        self.config = config
        self.seq_len = config.train.seq_len
        self.reset_at_docs = config.data.reset_at_doc_boundaries
        self.loss_vocab_block = config.train.get("loss_vocab_block", 0)
        self.z_loss = config.train.get("z_loss", 0.0)
        self.label_smoothing = config.train.get("label_smoothing", 0.0)
        self.by_context = config.train.get("eval_by_context", False)
        self.sp = None  # the tokenizer, once the data is prepared
        self.train_stream = None  # the train split's token stream (text inputs)
        self.train_streams = {}  # every train part's ({"train": ...} without a mixture)
        self.train_source = None  # its packed sequences, from either input
        self.held_out: dict[str, HeldOut] = {}  # "eval", then data.eval_sets' sets
        self.piece_bytes = None  # bytes a target decodes to, where that is exact
        vocab = config.model.vocab_size
        if prepare_data:
            self._prepare(workdir, eval_only)
            vocab = lm_vocab_size(self.sp, vocab)
        self.model_config = resolve_model_config(config.model, vocab_size=vocab)

    # -- data -----------------------------------------------------------------------

    def _prepare(self, workdir: str, eval_only: bool) -> None:
        data = self.config.data
        documents.check_text_field(data.get("text_field", documents.TEXT_FIELD))
        mixture = lm_data.parse_mixture(data.get("mixture", ""))
        if mixture and data.train_files:
            raise ValueError(
                "data.train_files and data.mixture are both set; give the train data once "
                "(data.mixture's parts, or data.train_files)"
            )
        specs = [(name, globs, f"data.mixture {name}") for name, globs, _ in mixture]
        if data.train_files:
            specs = [("train", data.train_files, "data.train_files")]
        self.mixture_weights = {name: weight for name, _, weight in mixture}
        if eval_only and data.eval_files:  # the train files are not read (nor need be there)
            eval_files = lm_data.expand_globs(data.eval_files, "data.eval_files")
            parts = {}  # their names, where still there: evaluating train text is refused
            for name, globs, what in specs:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    parts[name] = lm_data.expand_globs(globs, what)
        elif specs:
            parts = {name: lm_data.expand_globs(globs, what) for name, globs, what in specs}
            if data.eval_files:
                eval_files = lm_data.expand_globs(data.eval_files, "data.eval_files")
            else:  # hold out every 50th file (of each part of a mixture), as for the default
                eval_files = [f for files in parts.values() if len(files) >= 2 for f in files[::50]]
                if not eval_files:
                    what = "each part of data.mixture" if mixture else "data.train_files"
                    raise ValueError(
                        f"data.eval_files is empty and {what} names one file; give "
                        "held-out files with --config.data.eval_files"
                    )
                held = set(eval_files)
                parts = {name: [f for f in files if f not in held] for name, files in parts.items()}
                empty = [name for name, files in parts.items() if not files]
                if empty:  # cannot happen with >= 2 files a part: [::50] keeps one in 50
                    raise ValueError(f"data.mixture {empty[0]}: no train file left")
                if jax.process_index() == 0 and not eval_only:
                    train_files = [f for files in parts.values() for f in files]
                    size = lambda files: sum(os.path.getsize(f) for f in files)
                    share = size(eval_files) / max(size(eval_files) + size(train_files), 1)
                    large = " (a large share: with few files, give held-out files)" * (share > 0.1)
                    metrics_lib.say(
                        f"lrulm: data.eval_files is empty: holding out {len(eval_files)} of "
                        f"the {len(train_files) + len(eval_files)} train files for evaluation "
                        f"({', '.join(_short(f) for f in eval_files[:3])}"
                        f"{', ...' if len(eval_files) > 3 else ''}; {share:.0%} of the "
                        f"bytes{large}); set --config.data.eval_files to choose"
                    )
        else:
            if data.eval_files:
                raise ValueError("data.eval_files is set but data.train_files is not")
            train_files, eval_files = lm_data.default_corpus()
            parts = {"train": train_files}
        self.train_parts = parts  # {"train": files}, or data.mixture's {name: files}
        train_files = [f for files in parts.values() for f in files]
        lm_data.check_disjoint(train_files, eval_files, refuse=not eval_only)
        self.train_files, self.eval_files = train_files, eval_files
        held = {"eval": eval_files}  # the held-out splits: the run's, then data.eval_sets'
        for name, globs in lm_data.parse_eval_sets(data.get("eval_sets", "")).items():
            held[name] = lm_data.expand_globs(globs, f"data.eval_sets {name}")
            what = f"data.eval_sets {name}"
            lm_data.check_disjoint(train_files, held[name], what, refuse=not eval_only)
        packed = documents.is_packed(train_files + eval_files)
        if not packed and any(documents.is_packed([f]) for f in train_files + eval_files):
            raise ValueError(
                "data.train_files / eval_files mix .arrayrecord and text files; use one kind"
            )
        for name, files in held.items():
            if not documents.is_packed(files) and any(documents.is_packed([f]) for f in files):
                raise ValueError(f"data.eval_sets {name} mixes .arrayrecord and text files")
        own = os.path.join(workdir, "tokenizer.model")
        any_packed = packed or any(documents.is_packed(files) for files in held.values())
        if any_packed and not data.tokenizer and not (eval_only and os.path.exists(own)):
            raise ValueError(
                "ArrayRecord data (data.train_files, eval_files or eval_sets) needs the "
                "tokenizer it was prepared with: set --config.data.tokenizer"
            )
        if eval_only:  # the workdir's copy of the tokenizer the run trained with
            tok_path = own if os.path.exists(own) else data.tokenizer
            if not tok_path or not os.path.exists(tok_path):
                raise FileNotFoundError(
                    f"no tokenizer {tok_path or own}: evaluation needs the tokenizer the run "
                    "was trained with (give it with --config.data.tokenizer)"
                )
            if data.tokenizer and os.path.exists(data.tokenizer):
                workdir_tokenizer.check_same(data.tokenizer, own, workdir)
        else:
            tok_path = workdir_tokenizer.prepare(self.config, workdir, train_files)
        self.sp = tok.load_tokenizer(tok_path)
        packed_sets = {"data.eval_sets " + n: f for n, f in held.items() if n != "eval"}
        packed_sets.update({"data.eval_files": held["eval"], "data.train_files": train_files})
        for what, files in packed_sets.items():
            if documents.is_packed(files):
                lm_data.check_shards_tokenizer(files, self.sp, what)
        # Cache stems: train (or train-PART of a mixture), eval, eval-SET.
        stem = lambda split: "eval" if split == "eval" else f"eval-{split}"
        text = {stem(split): f for split, f in held.items() if not documents.is_packed(f)}
        train_stems = {name: "train" if name == "train" else f"train-{name}" for name in parts}
        if not eval_only and not packed:
            text = {**{train_stems[name]: parts[name] for name in parts}, **text}
        streams = self._tokenize(text, tok_path, workdir, eval_only)
        if not eval_only:
            sources = {}
            for name, files in parts.items():
                sources[name] = (
                    lm_data.ArrayRecordSequences(files, self.seq_len)
                    if packed  # pre-packed by tools/prepare_data.py: nothing to tokenize
                    else lm_data.PackedSequences(streams[train_stems[name]], self.seq_len)
                )
            self.train_streams = {n: streams[train_stems[n]] for n in parts if not packed}
            self.train_stream = self.train_streams.get("train")
            self.train_source = (
                lm_data.Mixture(sources, self.mixture_weights) if mixture else sources["train"]
            )
        for split, files in held.items():
            if stem(split) in streams:
                stream = streams[stem(split)]
                self.held_out[split] = HeldOut(
                    files,
                    lm_data.PackedSequences(stream, self.seq_len),
                    lm_data.PackedSequences(stream, self.seq_len, keep_tail=True),
                    stream.bytes_per_token,
                    stream,
                )
            else:
                source = lm_data.ArrayRecordSequences(files, self.seq_len)
                per_token = lm_data.shards_bytes_per_token(files)
                self.held_out[split] = HeldOut(files, source, source, per_token)
        # Bits per byte of the targets scored (a partial evaluation's own bytes) for each
        # text split whose bytes the tokenizer's pieces add up to; else the split's mean.
        self.piece_bytes = data_cache.piece_bytes(self.sp)
        for held in self.held_out.values():
            if held.stream is not None:
                held.exact_bytes = data_cache.counts_bytes_exactly(self.piece_bytes, held.stream)

    def _tokenize(self, splits: dict, tok_path: str, workdir: str, eval_only: bool) -> dict:
        """{stem: TokenStream} of text splits ({stem: files}; stems as "train", "eval",
        "eval-SET"), tokenized once into the workdir's data/ (or data.cache_dir, named by
        content) by process 0 and read by all."""
        shared = self.config.data.get("cache_dir", "")
        cache = shared or os.path.join(workdir, "data")

        field = self.config.data.get("text_field", documents.TEXT_FIELD)

        def cache_name(stem, files):
            if shared:  # named by their content: any run of the same files reads them
                return data_cache.content_name(files, tok_path, stem, field)
            if eval_only:  # the run's copy where it holds these files' tokens, else its own
                return data_cache.cache_name(files, tok_path, cache, stem, field)
            return stem  # training (re)makes its splits under their own names

        streams = {}
        main = jax.process_index() == 0
        for turn in ("main", "others"):  # process 0 tokenizes, the others then read
            if (turn == "main") == main:
                for stem, files in splits.items():
                    name = cache_name(stem, files)
                    streams[stem] = data_cache.prepare_split(
                        files, self.sp, tok_path, cache, name, shared=bool(shared), field=field
                    )
            distributed.barrier(f"lrulm_tokens_{turn}")
        for stem, stream in streams.items():
            if stream.num_tokens < self.seq_len + 1:
                kind, _, name = stem.partition("-")
                what = (
                    f"data.{'mixture' if kind == 'train' else 'eval_sets'} {name}" if name else stem
                )
                raise ValueError(
                    f"the {what} split has {stream.num_tokens} tokens, fewer than one sequence "
                    f"of train.seq_len={self.seq_len} (+1); use a shorter sequence or more data"
                )
        return streams

    def unigram_entropy(self) -> float | None:
        """Entropy (nats) of the training tokens' unigram distribution (of a mixture: its
        parts' distributions mixed by their weights): the loss a model that ignores
        context cannot beat. None for pre-packed data."""
        if not self.train_streams:
            return None
        weights = self.mixture_weights or {"train": 1.0}
        total = sum(weights.values())
        p = np.zeros(self.sp.get_piece_size())
        for name, stream in self.train_streams.items():
            counts = data_cache.token_counts(stream)[: len(p)]
            p[: len(counts)] += weights[name] / total * counts / max(counts.sum(), 1)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def batch_spec(self, global_batch: int) -> dict:
        shape = (global_batch, self.seq_len)
        return {"inputs": (shape, np.int32), "targets": (shape, np.int32)}

    def train_size(self) -> int:
        """Sequences in the train split (what a resume checks is unchanged)."""
        return len(self.train_source)

    def train_fingerprint(self) -> str:
        """A digest of sampled train sequences (what a resume checks is unchanged too)."""
        if isinstance(self.train_source, lm_data.Mixture):
            return self.train_source.fingerprint()
        return lm_data.sample_fingerprint(self.train_source)

    def eval_fingerprint(self, split: str = "eval") -> str:
        """A digest of sampled sequences of a held-out split (what the best checkpoint's
        value was measured on: a resume on other text moves it aside)."""
        return lm_data.sample_fingerprint(self.held_out[split].source_all)

    def train_batches(self, *, global_batch, row_offset, local_batch, seed):
        return lm_data.TrainStream(
            self.train_source,
            global_batch=global_batch,
            row_offset=row_offset,
            local_batch=local_batch,
            seed=seed,
            num_threads=self.config.data.num_threads,
        )

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The held-out splits each evaluation scores: "eval", then data.eval_sets' names."""
        return tuple(self.held_out) or ("eval",)

    def eval_batches(self, split, *, global_batch, row_offset, local_batch, num_batches):
        """The first num_batches global batches of a held-out split ("eval" or a name of
        data.eval_sets), in order (fewer if it is short); num_batches <= 0: all of it, every
        token a target once (the last sequence and batch filled up with PAD, which the
        loss weighs 0)."""
        if split not in self.held_out:
            raise ValueError(
                f"a language model's held-out splits are {', '.join(self.eval_splits)}; "
                f"not {split!r}"
            )
        source, count = self._eval_source(split, global_batch, num_batches)
        return self._eval_iter(source, count, global_batch, row_offset, local_batch)

    def check_eval(self, global_batch: int, num_batches: int) -> None:
        """Raises now (not at the first evaluation) if a held-out split cannot fill a
        batch; says when one holds fewer batches than train.eval_steps asks for (it is
        then scored whole, padded)."""
        for split in self.held_out:
            _, count = self._eval_source(split, global_batch, num_batches)
            if num_batches and num_batches > count and jax.process_index() == 0:
                what = "eval split" if split == "eval" else f"eval set {split}"
                metrics_lib.say(
                    f"lrulm: the {what} holds fewer than train.eval_steps={num_batches} "
                    f"batches of {global_batch}: each evaluation scores it whole ({count} "
                    f"batch{'es' * (count != 1)}, the last padded)"
                )

    def _eval_source(self, split, global_batch, num_batches):
        """(source, batches) of a held-out split: its first num_batches batches, or, for
        num_batches <= 0 or a split holding fewer, all of it with the tail padded."""
        held = self.held_out[split]
        if num_batches and len(held.source) // global_batch < num_batches:
            num_batches = 0  # a small split is scored whole (padded), not cut or refused
        if num_batches is None or num_batches <= 0:
            source = lm_data.PaddedRows(held.source_all, global_batch, self.seq_len)
            num_batches = available = len(source) // global_batch
        else:
            source = held.source
            available = len(source) // global_batch
        if available == 0:  # an empty split (the tokenizing checks one sequence is there)
            what = "eval split" if split == "eval" else f"eval set {split}"
            raise ValueError(f"the {what} holds no sequence of {self.seq_len} tokens")
        return source, min(num_batches, available)

    def _eval_iter(self, source, count, global_batch, row_offset, local_batch):
        it = lm_data.batches(
            source,
            global_batch=global_batch,
            row_offset=row_offset,
            local_batch=local_batch,
            seed=0,
            shuffle=False,
            repeat=False,
            num_threads=1,
        )
        for _ in range(count):
            yield next(it)

    # -- model, loss, metrics ---------------------------------------------------------

    def make_model(self, rngs):
        return LanguageModel(self.model_config, rngs=rngs)

    def loss(self, model, batch, *, train, key):
        inputs, targets = batch["inputs"], batch["targets"]
        resets = None
        if self.reset_at_docs:  # a document starts after each EOS
            resets = jnp.pad(inputs[:, :-1] == tok.EOS_ID, ((0, 0), (1, 0)))
        x = model.features(inputs, resets=resets, train=train, key=key)
        w = model.head_weight(x.dtype)
        losses, lse, correct = cross_entropy_and_lse(
            x, w, targets, vocab_block=self.loss_vocab_block
        )
        weights = (targets != tok.PAD_ID).astype(jnp.float32)
        aux = {"accuracy": jnp.sum(correct.astype(jnp.float32) * weights)}
        if not train and self.piece_bytes is not None:  # the text the targets decode to
            table = jnp.asarray(self.piece_bytes, jnp.float32)
            aux["bytes"] = jnp.sum(table[jnp.minimum(targets, len(self.piece_bytes) - 1)] * weights)
        loss = jnp.sum(losses * weights)
        if not train and self.by_context:
            aux.update(_by_context(losses, weights, resets))
        if train and self.label_smoothing:  # eval/loss stays the plain cross-entropy
            # Against (1 - e) onehot + e uniform over the tokenizer's ids: the mean of their
            # logits is x @ (the mean of their output columns), no (b, l, v) logits needed.
            e = self.label_smoothing
            n = self.sp.get_piece_size() if self.sp is not None else w.shape[1]
            real = (jnp.arange(w.shape[1]) < n).astype(w.dtype)  # a mask: no vocab slicing
            mean_w = jnp.einsum("hv,v->h", w, real, preferred_element_type=jnp.float32) / n
            mean_logit = jnp.einsum("blh,h->bl", x.astype(jnp.float32), mean_w)
            aux["cross_entropy"] = loss
            loss = (1 - e) * loss + e * jnp.sum((lse - mean_logit) * weights)
        if train and self.z_loss:  # trained, not evaluated: eval/loss is the cross-entropy
            aux["z_loss"] = self.z_loss * jnp.sum(jnp.square(lse) * weights)
            loss = loss + aux["z_loss"]
        return loss, jnp.sum(weights), aux

    def finalize(self, sums: dict, split: str = "eval") -> dict:
        """Per-token loss, perplexity and accuracy of a held-out split's summed statistics,
        the targets scored, and bits per byte: of the bytes those targets decode to where
        the tokenizer counts them exactly (`piece_bytes`), else with the split's mean
        bytes per token (ArrayRecord shards, or a tokenizer with a dummy prefix)."""
        loss = sums["loss"] / max(sums["weight"], 1.0)
        out = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "accuracy": sums["accuracy"] / max(sums["weight"], 1.0),
            "tokens": sums["weight"],  # the targets scored
        }
        by_context = [k for k in sums if k.startswith("loss_ctx")]
        for key in sorted(by_context, key=lambda k: int(k.removeprefix("loss_ctx"))):
            tokens = sums["tokens" + key.removeprefix("loss")]
            if tokens:
                out[key] = sums[key] / tokens
        held = self.held_out.get(split)
        if sums.get("bytes") and held is not None and held.exact_bytes:
            out["bits_per_byte"] = sums["loss"] / math.log(2) / sums["bytes"]
        elif self.bytes_per_token(split):
            out["bits_per_byte"] = loss / math.log(2) / self.bytes_per_token(split)
        return out

    def bytes_per_token(self, split: str = "eval") -> float | None:
        """A held-out split's UTF-8 bytes per token (over the whole split; None if unknown)."""
        held = self.held_out.get(split)
        return held.bytes_per_token if held is not None else None

    def tokens_per_example(self) -> int:
        return self.seq_len

    def num_params(self) -> int:
        return self.model_config.num_params()

    def flops_per_token(self, seq_len: int) -> float:
        return self.model_config.flops_per_token(seq_len)


# A language model's per-split evaluation metrics checkpoint.keep_best can name.
LM_EVAL_METRICS = ("loss", "perplexity", "bits_per_byte", "accuracy")


def best_metric(config) -> tuple[str, str] | None:
    """(metric, "max"|"min") the run keeps its best checkpoint (WORKDIR/best/) by, or None:
    checkpoint.keep_best, else the task's default (LRA: eval accuracy, the paper's
    protocol; a language model: none). A language model names a metric of its "eval"
    split ("loss") or of a data.eval_sets set ("NAME/loss"). Raises ValueError (before
    anything is read or compiled) for a metric no evaluation reports."""
    keep = config.checkpoint.get("keep_best", "").strip()
    if config.task != "lm":
        if keep not in ("", "accuracy"):
            raise ValueError(
                f"checkpoint.keep_best={keep!r}: an LRA run keeps its best checkpoint by eval "
                "accuracy (the paper reports test accuracy there); leave it unset"
            )
        return ("accuracy", "max")
    if not keep:
        return None
    split, _, metric = keep.rpartition("/")
    sets = lm_data.parse_eval_sets(config.data.get("eval_sets", ""))
    metrics = ", ".join(LM_EVAL_METRICS)
    if metric not in LM_EVAL_METRICS:
        raise ValueError(
            f"checkpoint.keep_best={keep!r}: {metric!r} is no evaluation metric; give one of "
            f"{metrics}" + (", or an eval set's NAME/METRIC" if sets else "")
        )
    if split and split not in sets:
        named = f"data.eval_sets names {', '.join(sets)}" if sets else "data.eval_sets is empty"
        raise ValueError(
            f"checkpoint.keep_best={keep!r}: no eval set {split!r} ({named}); give "
            f"METRIC for the eval split ({metrics}) or NAME/METRIC"
        )
    return (keep, "max" if metric == "accuracy" else "min")


def check_best_metric(task, keep: tuple[str, str] | None) -> None:
    """Raises ValueError, once the data is ready and before any step, if the evaluation of
    keep_best's split will not report its metric (bits_per_byte of ArrayRecord shards
    whose bytes nothing recorded): what the split's `finalize` makes of statistics."""
    if keep is None or task.name != "lm":
        return
    split, _, metric = keep[0].rpartition("/")
    split = split or "eval"
    reported = task.finalize({"loss": 1.0, "weight": 1.0, "accuracy": 0.0, "bytes": 1.0}, split)
    if metric not in reported:
        names = ", ".join(m for m in LM_EVAL_METRICS if m in reported)
        raise ValueError(
            f"checkpoint.keep_best={keep[0]!r}: the {split} split's evaluation reports no "
            f"{metric} (its bytes are not known: e.g. ArrayRecord shards without their "
            f"meta.json); keep the best by {names}"
        )


def make_task(config, workdir: str | None, *, prepare_data: bool = True, eval_only: bool = False):
    """The task a config names; prepare_data=False builds only what compiling needs;
    eval_only the held-out splits alone (`lrulm eval`: no train split read)."""
    if config.task == "lm":
        return LMTask(config, workdir, prepare_data=prepare_data, eval_only=eval_only)
    from lrulm import lra_task

    return lra_task.ClassificationTask(
        config, workdir, prepare_data=prepare_data, eval_only=eval_only
    )
