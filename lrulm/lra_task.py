"""Long Range Arena classification: the task the trainer runs for the six LRA benchmarks.

Notation: b batch, l length (per document for Retrieval), c classes.

One global batch (`ClassificationTask.batch_spec`):

    inputs  int32 (b, l) tokens | float32 (b, l, 1) pixels | int32 (b, 2, l) Retrieval pairs
    mask    bool  (b, l)                                   | bool  (b, 2, l)
    label   int32 (b,)
    weight  float32 (b,)   1 for real rows; 0 for the rows that pad the last eval batch

Training batches are the train split shuffled with `data.seed` (-1: `train.seed`) (a new order every
epoch), repeated forever, each process reading only its rows of every global batch
(`lrulm.data.lm.TrainStream`, positioned by rows read). Evaluation reads the validation
("eval") or "test" split in file order: with `train.eval_steps <= 0` every example
exactly once (the last global batch padded with weight-0 rows), else the first
`eval_steps` batches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrulm.data import lm as lm_data
from lrulm.data import lra
from lrulm.model import Classifier
from lrulm.tasks import resolve_model_config

POOLINGS = ("mean", "last")
# The trainer's split names -> the loaders'. "eval" selects the best checkpoint.
_SPLITS = {"train": "train", "eval": "val", "test": "test"}


class _Weighted:
    """A source's records plus a "weight": 1 for its rows, then weight-0 copies of its
    first rows up to `size` (so the last global batch is full and counts nothing extra).
    A record that turned out unreadable (on_error="skip") has weight 0 too.

    The padding rows are real records rather than zeros, so no row can produce a
    non-finite value that a zero weight would not cancel (0 * nan = nan).
    """

    def __init__(self, source, size: int | None = None):
        self._source = source
        self._len = len(source)
        self._size = self._len if size is None else size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        record, readable = self._source.read(index % self._len)
        record = dict(record)
        record["weight"] = np.float32(index < self._len and readable)
        return record

    def __repr__(self) -> str:  # grain keys iterator checkpoints on the source's repr
        return f"_Weighted({self._source!r}, size={self._size})"


def _pooling(config) -> str:
    """`config.lra.pooling`, or "mean" (minimal-LRU and S5 on every LRA task) without it."""
    group = config.get("lra") or {}
    pooling = group.get("pooling", "mean")
    if pooling not in POOLINGS:
        raise ValueError(f"lra.pooling={pooling!r}; use one of {POOLINGS}")
    return pooling


class ClassificationTask:
    """Sequence classification on one LRA task (`config.task`), scored by accuracy.

    Args:
      config: the experiment config: `task`, `model.*`, `data.data_dir`, `data.on_error`,
        `data.num_threads`, `train.seq_len` (record length; per document for Retrieval;
        fixed at 1024 / 16384 for the pixel tasks) and the optional `lra.pooling`.
      workdir: unused (LRA data is read in place); kept for the task protocol.
      prepare_data: open the three splits now, so a bad `data.data_dir` fails before
        anything compiles; False touches no file (ahead-of-time compilation).
      eval_only: open the eval and test splits alone (`lrulm eval`: the train split, a
        GB of Retrieval's, is neither needed nor read).

    Raises:
      ValueError: an unknown task, unset data_dir, a sequence length the task cannot
        take, or malformed data (the loaders name the file and line).
      FileNotFoundError: the task's files are not under data_dir (the paths tried named).
    """

    best_metric = ("accuracy", "max")  # the paper reports test accuracy at the best val

    def __init__(
        self,
        config,
        workdir: str | None = None,
        *,
        prepare_data: bool = True,
        eval_only: bool = False,
    ):
        del workdir
        if config.task not in lra.TASKS:
            raise ValueError(
                f"unknown task {config.task!r}; use 'lm' or an LRA task: {', '.join(lra.TASKS)}"
            )
        self.config = config
        self.name = config.task
        self.spec = spec = lra.TASKS[config.task]
        self.seq_len = int(config.train.seq_len)
        if spec.vocab_size is None and self.seq_len != spec.seq_len:
            side = math.isqrt(spec.seq_len)
            raise ValueError(
                f"train.seq_len={self.seq_len} for {spec.name}: its {side}x{side} images are "
                f"{spec.seq_len} pixels; set train.seq_len={spec.seq_len}"
            )
        self.pooling = _pooling(config)
        # Pixel tasks feed features through a Dense encoder: vocab_size 0 says so.
        self.model_config = resolve_model_config(config.model, vocab_size=spec.vocab_size or 0)
        self.sources: dict[str, lra.LRASource] = {}
        if prepare_data:
            self._open_splits(("eval", "test") if eval_only else tuple(_SPLITS))

    # -- data -----------------------------------------------------------------------

    def _open_splits(self, splits) -> None:
        data = self.config.data
        if not data.data_dir:
            raise ValueError(
                f"data.data_dir is not set: point it at the folder holding the {self.name} "
                f"files (--config.data.data_dir=DIR; layouts in configs/lra/{self.name}.py)"
            )
        seq_len = self.seq_len if self.spec.vocab_size is not None else None
        for split in splits:
            loader_split = _SPLITS[split]
            self.sources[split] = lra.load_split(
                self.name, data.data_dir, loader_split, seq_len=seq_len, on_error=data.on_error
            )

    def _source(self, split: str):
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
        if split not in self.sources:
            raise RuntimeError(
                f"the {split} split was not opened (the task was built with "
                "prepare_data=False, or eval_only)"
            )
        return self.sources[split]

    def split_size(self, split: str) -> int:
        """Examples in a split ("train", "eval" or "test")."""
        return len(self._source(split))

    def eval_fingerprint(self, split: str = "eval") -> str:
        """A digest of sampled examples of a split (what the best checkpoint's value was
        measured on: a resume on other data moves it aside)."""
        return lm_data.sample_fingerprint(self._source(split))

    def train_size(self) -> int:
        """Examples in the train split (what a resume checks is unchanged)."""
        return self.split_size("train")

    def train_fingerprint(self) -> str:
        """A digest of sampled train examples (what a resume checks is unchanged too)."""
        return lm_data.sample_fingerprint(self._source("train"))

    def batch_spec(self, global_batch: int) -> dict:
        """{name: (global shape, numpy dtype)} of one global batch (module docstring)."""
        b, l = global_batch, self.seq_len
        if self.spec.dual:
            inputs, mask = ((b, 2, l), np.int32), ((b, 2, l), np.bool_)
        elif self.spec.vocab_size is None:
            inputs, mask = ((b, l, self.spec.input_channels), np.float32), ((b, l), np.bool_)
        else:
            inputs, mask = ((b, l), np.int32), ((b, l), np.bool_)
        return {
            "inputs": inputs,
            "mask": mask,
            "label": ((b,), np.int32),
            "weight": ((b,), np.float32),
        }

    def train_batches(self, *, global_batch, row_offset, local_batch, seed):
        """This process's rows of each global training batch, positioned by rows consumed
        (`lrulm.data.lm.TrainStream`)."""
        return lm_data.TrainStream(
            _Weighted(self._source("train")),
            global_batch=global_batch,
            row_offset=row_offset,
            local_batch=local_batch,
            seed=seed,
            num_threads=self.config.data.num_threads,
        )

    def eval_batches(self, split, *, global_batch, row_offset, local_batch, num_batches):
        """This process's rows of the split's global batches, in file order.

        Args:
          split: "eval" (the validation split) or "test".
          global_batch, row_offset, local_batch: the global batch size and this
            process's first row and row count within it.
          num_batches: None or <= 0 for a full pass (every example exactly once; the
            last batch padded with weight-0 rows), else at most this many batches.
        """
        source = self._source(split)
        total = -(-len(source) // global_batch)
        count = total if not num_batches or num_batches <= 0 else min(num_batches, total)
        padded = _Weighted(source, size=total * global_batch)
        it = lm_data.batches(
            padded,
            global_batch=global_batch,
            row_offset=row_offset,
            local_batch=local_batch,
            seed=0,
            shuffle=False,
            repeat=False,
            num_threads=self.config.data.num_threads,
        )
        for _ in range(count):
            yield next(it)

    # -- model, loss, metrics ---------------------------------------------------------

    def make_model(self, rngs):
        """The LRU classifier for this task (token or pixel encoder; two towers' features
        combined for Retrieval)."""
        return Classifier(
            self.model_config,
            num_classes=self.spec.num_classes,
            input_channels=self.spec.input_channels or 1,
            pooling=self.pooling,
            dual=self.spec.dual,
            rngs=rngs,
        )

    def loss(self, model, batch, *, train, key):
        """Weighted sums over the batch: cross-entropy, weight, and correct predictions."""
        logits = model(batch["inputs"], batch["mask"], train=train, key=key)
        labels, weight = batch["label"], batch["weight"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        aux = {"accuracy": jnp.sum(correct * weight)}
        smoothing = self.config.train.get("label_smoothing", 0.0)
        if train and smoothing:  # eval/loss stays the plain cross-entropy
            aux["cross_entropy"] = jnp.sum(losses * weight)
            onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
            targets = optax.smooth_labels(onehot, smoothing)
            losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
        return jnp.sum(losses * weight), jnp.sum(weight), aux

    eval_splits = ("eval",)  # what each evaluation scores (the test split: at the end)

    def finalize(self, sums: dict, split: str = "eval") -> dict:
        """Mean loss and accuracy over the evaluated examples, and how many there were."""
        n = max(sums["weight"], 1.0)
        return {
            "loss": sums["loss"] / n,
            "accuracy": sums["accuracy"] / n,
            "examples": sums["weight"],
        }

    def tokens_per_example(self) -> int:
        """Sequence positions one example feeds the model (both documents for Retrieval)."""
        return self.seq_len * (2 if self.spec.dual else 1)

    def _head_sizes(self) -> tuple[int, int, int]:
        """(encoder weights per position, head weights per example, encoder bias)."""
        mc, h = self.model_config, self.model_config.d_model
        pixel = 0 if mc.vocab_size else (self.spec.input_channels or 1) * h
        head = (4 * h * h if self.spec.dual else 0) + h * self.spec.num_classes
        bias = h if not mc.vocab_size and mc.norm != "batch" else 0
        return pixel, head, bias

    def num_params(self) -> int:
        """The classifier's parameter count (model.Classifier), from the shapes."""
        mc, h = self.model_config, self.model_config.d_model
        pixel, head, bias = self._head_sizes()
        encoder = mc.vocab_size * h if mc.vocab_size else pixel + bias
        head += (h if self.spec.dual else 0) + self.spec.num_classes  # biases
        return mc.stack_params() + encoder + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per position: the stack's, a pixel encoder's matmul, and the
        head's per example spread over its positions (no vocabulary-sized head)."""
        pixel, head, _ = self._head_sizes()
        per_example = 3 * 2 * head / self.tokens_per_example()
        return self.model_config.flops_per_token(seq_len, lm_head=False) + 6 * pixel + per_example
