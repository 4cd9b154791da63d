"""Language-model data: files -> tokens -> packed fixed-length sequences -> Grain batches.

Pipeline:
  1. Text files (plain text, or JSON lines with a "text" field) given as globs, or the
     embedded default: the Python standard library's own source.
  2. Tokenized once per workdir (process 0; the others wait) into a flat token stream,
     each document followed by EOS, stored as .npy next to a fingerprint so a rerun
     reuses it (lrulm.data.cache). Pre-packed ArrayRecord files (tools/prepare_data.py)
     skip this step.
  3. Packed: sequence i is tokens[i*L : i*L + L] with targets shifted by one. The
     model zeroes its recurrent state where a new document starts (after an EOS), so
     documents packed side by side do not leak into each other.
  4. Shuffled with a seed (a new order every epoch), and sliced per process: at step s
     process p reads only rows [s*G + off_p, s*G + off_p + G_p) of the global order,
     the rows its devices hold, so the global batch is identical whatever the number
     of processes. The position saved with a checkpoint is the number of rows of that
     order consumed (`TrainStream`), so a resume is exact, also with another global
     batch size or number of processes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import sysconfig
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grain
import numpy as np

from lrulm.data import tokenizer as tok

if TYPE_CHECKING:
    from lrulm.data.cache import TokenStream

log = logging.getLogger(__name__)

_EVAL_EVERY = 50  # default corpus: every 50th file (sorted order) is held out


# -- files ---------------------------------------------------------------------------------


def default_corpus() -> tuple[list[str], list[str]]:
    """The embedded default: the standard library's .py files (tests excluded), sorted,
    split deterministically into (train, eval): every 50th file is held out. The files
    an interpreter's build writes (`_sysconfigdata_*.py`, `config-3.*/`: its build paths
    and flags) are left out, so that installs of one Python version read the same text."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "__pycache__", "test", "tests", "idle_test"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("config-"))
        files += [
            os.path.join(dirpath, f)
            for f in filenames
            if f.endswith(".py") and not f.startswith("_sysconfigdata")
        ]
    files.sort(key=lambda p: os.path.relpath(p, root))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    eval_files = files[::_EVAL_EVERY]
    held = set(eval_files)
    return [f for f in files if f not in held], eval_files


def expand_globs(patterns: str | Sequence[str], what: str) -> list[str]:
    """Expands comma-separated / listed globs; errors name the pattern that matched nothing.
    A file two patterns match is listed once (at its first match), not read twice."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern.strip()), recursive=True))
        matched = [f for f in matched if os.path.isfile(f)]
        if not matched:
            raise FileNotFoundError(f"{what}: the glob {pattern!r} matches no files")
        for f in matched:
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                files.append(f)
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty and len(empty) == len(files):
        raise ValueError(f"{what}: every file is empty ({', '.join(empty[:3])})")
    return files


def check_disjoint(
    train_files: Sequence[str],
    eval_files: Sequence[str],
    what: str = "data.eval_files",
    *,
    refuse: bool = True,
) -> None:
    """Refuses held-out files that are also train files: their evaluation would score
    text the model was trained on. refuse=False (`lrulm eval` of a trained checkpoint,
    e.g. to compare its train and held-out loss): says so instead."""
    train = {os.path.realpath(f) for f in train_files}
    shared = [f for f in eval_files if os.path.realpath(f) in train]
    if shared and not refuse:
        import jax  # here: reading files needs neither jax nor lrulm.metrics

        from lrulm import metrics as metrics_lib

        if jax.process_index() == 0:
            metrics_lib.say(
                f"lrulm: note: {what} and the run's train files share {len(shared)} file(s) "
                f"({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}): this "
                "evaluation scores text the model trained on"
            )
    elif shared:
        hint = (
            ", or leave data.eval_files empty to hold out every 50th train file"
            if what == "data.eval_files"
            else ""
        )
        raise ValueError(
            f"{what} and data.train_files share {len(shared)} file(s) "
            f"({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}): their evaluation "
            f"would score text the model trained on. Leave them out of data.train_files{hint}"
        )


_RESERVED_SPLITS = ("train", "eval", "test")


def parse_eval_sets(text: str) -> dict[str, str]:
    """data.eval_sets, "NAME=GLOBS;NAME=GLOBS" (GLOBS comma-separated, as data.eval_files),
    as {NAME: GLOBS} in the order given; a ValueError says what is malformed."""
    sets: dict[str, str] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        name, sep, globs = (x.strip() for x in item.partition("="))
        if not sep or not globs.strip(", "):
            raise ValueError(
                f"data.eval_sets: {item!r} is not NAME=GLOBS; write e.g. "
                "'code=held/code/*.jsonl;prose=held/books/*.txt'"
            )
        _check_name(name, sets, "data.eval_sets", "a set")
        sets[name] = globs
    return sets


def _check_name(name: str, taken, key: str, what: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in _RESERVED_SPLITS:
        raise ValueError(
            f"{key}: {name!r} cannot name {what} (letters, digits, '_', '.', '-'; "
            f"not {', '.join(_RESERVED_SPLITS)})"
        )
    if name in taken:
        raise ValueError(f"{key} names {name!r} twice")


def parse_mixture(text: str) -> list[tuple[str, str, float]]:
    """data.mixture, "NAME=GLOBS@WEIGHT;..." (GLOBS comma-separated), as (name, globs,
    weight) in the order given; a ValueError says what is malformed."""
    parts: list[tuple[str, str, float]] = []
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        name, sep, rest = (x.strip() for x in item.partition("="))
        globs, at, weight_text = (x.strip() for x in rest.rpartition("@"))
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not (sep and at and globs.strip(", ")):
            raise ValueError(
                f"data.mixture: {item!r} is not NAME=GLOBS@WEIGHT; write e.g. "
                "'web=data/web/*.jsonl@0.7;code=data/code/*.jsonl@0.3'"
            )
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(
                f"data.mixture {name}: the weight must be positive; got {weight_text!r}"
            )
        _check_name(name, {p[0] for p in parts}, "data.mixture", "a part")
        parts.append((name, globs, weight))
    if len(parts) == 1:
        raise ValueError(
            "data.mixture has one part; give data.train_files for one source, or more parts"
        )
    return parts


def sample_fingerprint(source, samples: int = 64) -> str:
    """A digest of `samples` examples spread evenly over a source, and its length: what
    a resume compares to find other train data (other files, another order of them, or
    edited text) behind the same number of examples. Reads only those examples."""
    n = len(source)
    h = hashlib.sha256(str(n).encode())
    for i in sorted(set(np.linspace(0, n - 1, min(samples, n)).astype(int).tolist())):
        example = source[i]
        for key in sorted(example):
            h.update(key.encode() + np.ascontiguousarray(example[key]).tobytes())
    return h.hexdigest()[:16]


# -- packed sequences ------------------------------------------------------------------------


class Mixture:
    """Train sequences of several sources (data.mixture's parts) in fixed proportions:
    each source shuffled with a seed of its own and repeated (a new order each epoch of
    it), then interleaved by Grain's weighted mix, so every stretch of rows holds the
    parts in the weights' proportions however long or short each part is."""

    def __init__(self, sources: dict, weights: dict[str, float]):
        self.sources, self.weights = sources, weights
        # Grain mixes by integer proportions, the smallest weight scaled to 100 (so the
        # shares are those of the weights to within 1% of the smallest): these, exactly.
        low = min(weights[n] for n in sources)
        self.proportions = [round(weights[n] * 100 / low) for n in sources]

    def __len__(self) -> int:  # sequences over all parts (the run's data signature)
        return sum(len(s) for s in self.sources.values())

    def dataset(self, seed: int) -> grain.MapDataset:
        parts = []
        for k, source in enumerate(self.sources.values()):
            part_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
            parts.append(grain.MapDataset.source(source).shuffle(seed=part_seed).repeat(None))
        return grain.MapDataset.mix(parts, self.proportions)

    def fingerprint(self) -> str:
        """Each part's sample_fingerprint, with its name and proportion (weights that mix
        alike, 3:1 and 6:2, give one fingerprint)."""
        h = hashlib.sha256()
        for (name, source), share in zip(self.sources.items(), self.proportions):
            h.update(f"{name}@{share}:{sample_fingerprint(source)};".encode())
        return h.hexdigest()[:16]


class PackedSequences(grain.sources.RandomAccessDataSource):
    """Sequence i of a token stream: inputs tokens[iL : iL+L], targets one step later.

    With keep_tail, a last, shorter sequence holds the tokens left over, padded with
    PAD (which the loss weighs 0), so that every token is a target exactly once."""

    def __init__(self, stream: TokenStream, seq_len: int, *, keep_tail: bool = False):
        self._path, self._seq_len = stream.path, seq_len
        targets = stream.num_tokens - 1
        self._len = max(0, -(-targets // seq_len) if keep_tail else targets // seq_len)
        self._tokens = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self._tokens is None:  # opened lazily: the source is pickled to workers
            self._tokens = np.load(self._path, mmap_mode="r")
        start = int(i) * self._seq_len
        window = np.asarray(self._tokens[start : start + self._seq_len + 1], np.int32)
        if window.size < self._seq_len + 1:  # the tail (keep_tail)
            window = np.pad(
                window, (0, self._seq_len + 1 - window.size), constant_values=tok.PAD_ID
            )
        return {"inputs": window[:-1], "targets": window[1:]}

    def __getstate__(self):
        return {"_path": self._path, "_seq_len": self._seq_len, "_len": self._len, "_tokens": None}


SHARD_NAME = re.compile(r"^(?P<prefix>.*)-\d{5}-of-(?P<count>\d{5})\.arrayrecord$")


def shards_meta_path(prefix: str) -> str:
    """tools/prepare_data.py's record of a shard set's token and byte counts."""
    return f"{prefix}.meta.json"


def shards_bytes_per_token(paths: Sequence[str]) -> float | None:
    """The text bytes per token of the shard sets the paths belong to (from each set's
    meta.json); None where a set has none (written before it was recorded)."""
    tokens = num_bytes = 0
    for prefix in sorted({m["prefix"] for m in map(SHARD_NAME.match, paths) if m}):
        try:
            with open(shards_meta_path(prefix)) as f:
                meta = json.load(f)
            tokens, num_bytes = tokens + int(meta["tokens"]), num_bytes + int(meta["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return num_bytes / tokens if tokens else None


def tokenizer_digest(sp) -> str:
    """sha256 of a loaded tokenizer's model (what tools/prepare_data.py records)."""
    return hashlib.sha256(sp.serialized_model_proto()).hexdigest()


def check_shards_tokenizer(paths: Sequence[str], sp, what: str) -> None:
    """Refuses shard sets whose meta.json records another tokenizer than `sp` (their ids
    would be read as this tokenizer's pieces); sets without the record pass."""
    want = tokenizer_digest(sp)
    for prefix in sorted({m["prefix"] for m in map(SHARD_NAME.match, paths) if m}):
        try:
            with open(shards_meta_path(prefix)) as f:
                recorded = json.load(f).get("tokenizer_sha256")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded and recorded != want:
            raise ValueError(
                f"{what}: {prefix}-*.arrayrecord were prepared with another tokenizer than "
                "this run's; give the run that tokenizer (data.tokenizer), or prepare them "
                "again with the run's (tools/prepare_data.py --tokenizer)"
            )


def check_shard_sets(paths: Sequence[str]) -> None:
    """Refuses shards of one prefix (tools/prepare_data.py's `PREFIX-XXXXX-of-NNNNN`) from
    more than one run: an older run's shards left beside a newer one's, which a glob would
    read as well. (A subset of one run's shards is fine: a shorter run, say.)"""
    counts: dict[str, set[int]] = {}
    for path in paths:
        m = SHARD_NAME.match(path)
        if m:
            counts.setdefault(m["prefix"], set()).add(int(m["count"]))
    for prefix, sizes in counts.items():
        if len(sizes) > 1:
            raise ValueError(
                f"{prefix}-*.arrayrecord are shards of {len(sizes)} tools/prepare_data.py "
                f"runs ({' and '.join(f'-of-{n:05d}' for n in sorted(sizes))}); delete the "
                "older run's shards"
            )


class ArrayRecordSequences(grain.sources.RandomAccessDataSource):
    """Pre-packed sequences of L+1 tokens written by tools/prepare_data.py."""

    def __init__(self, paths: Sequence[str], seq_len: int):
        check_shard_sets(paths)
        self._source = grain.sources.ArrayRecordDataSource(list(paths))
        if not len(self._source):
            raise ValueError(f"the ArrayRecord files {list(paths)[:3]} hold no sequences")
        from array_record.python.array_record_module import ArrayRecordReader

        for path in paths:  # each file's first record: files of another run differ
            reader = ArrayRecordReader(path)
            try:
                first = self._decode(reader.read([0])[0]) if reader.num_records() else None
            finally:
                reader.close()
            if first is not None and first.size != seq_len + 1:
                raise ValueError(
                    f"{path} holds sequences of {first.size - 1} tokens but train.seq_len is "
                    f"{seq_len}; prepare the data again with --seq_len {seq_len}"
                )

    @staticmethod
    def _decode(record: bytes) -> np.ndarray:
        return np.frombuffer(record, np.uint32)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        window = self._decode(self._source[int(i)]).astype(np.int32)
        return {"inputs": window[:-1], "targets": window[1:]}


class PaddedRows(grain.sources.RandomAccessDataSource):
    """A source of sequences followed by all-PAD rows (weight 0 in the loss) up to a
    multiple of `multiple` rows: a full pass in whole global batches."""

    def __init__(self, source, multiple: int, seq_len: int):
        self._source, self._seq_len = source, seq_len
        self._len = -(-len(source) // multiple) * multiple

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if int(i) < len(self._source):
            return self._source[int(i)]
        pad = np.full((self._seq_len,), tok.PAD_ID, np.int32)
        return {"inputs": pad, "targets": pad}


class _ProcessRows(grain.MapDataset):
    """Row k of this process = global row first + (k // n) * G + offset + k % n, n local
    rows of each global batch of G, from global row `first` on."""

    def __init__(
        self, parent: grain.MapDataset, global_batch: int, offset: int, local: int, first: int
    ):
        super().__init__(parent)
        self._g, self._off, self._n, self._first = global_batch, offset, local, first

    def __len__(self) -> int:
        return max(0, (len(self._parent) - self._first) // self._g) * self._n

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        step, j = divmod(int(k), self._n)
        return self._parent[self._first + step * self._g + self._off + j]

    def __str__(self) -> str:
        return (
            f"_ProcessRows(global={self._g}, offset={self._off}, local={self._n}, "
            f"first={self._first})"
        )


def batches(
    source,
    *,
    global_batch: int,
    row_offset: int,
    local_batch: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    num_threads: int = 2,
    first_row: int = 0,
) -> grain.DatasetIterator:
    """An iterator of this process's share of each global batch (dicts of (n, L) int32).

    Element s holds global rows [first_row + s*G, first_row + (s+1)*G) of the (shuffled,
    repeated) order, this process's rows of them.
    """
    if isinstance(source, Mixture):  # shuffled, repeated and mixed part by part
        if not (shuffle and repeat):
            raise ValueError("a mixture is read shuffled and repeated (it is train data)")
        ds = source.dataset(seed)
    else:
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        if repeat:
            ds = ds.repeat(None)
    ds = _ProcessRows(ds, global_batch, row_offset, local_batch, first_row)
    ds = ds.batch(local_batch, drop_remainder=True)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(read))


class TrainStream:
    """This process's share of consecutive global training batches, positioned by rows.

    The state a checkpoint stores is {"rows": R, "global_batch": G}: R rows of the
    shuffled, repeated order consumed so far. A stream given that state goes on at row R
    whatever its own global batch size, so a resume with another batch size (or another
    number of processes) reads every row exactly once, in order. States of checkpoints
    written before the position was kept in rows ({"next_index": steps}) count steps of
    their "global_batch" (else of this stream's).

    Grain's checkpoint handler saves and restores it (get_state / set_state, as bytes).
    """

    def __init__(self, source, *, global_batch, row_offset, local_batch, seed, num_threads=2):
        self._make = lambda first_row: batches(
            source,
            global_batch=global_batch,
            row_offset=row_offset,
            local_batch=local_batch,
            seed=seed,
            num_threads=num_threads,
            first_row=first_row,
        )
        self.global_batch = global_batch
        self.rows = 0
        self._it = None  # started at the first batch: a restored position builds no pipeline

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make(self.rows)
        batch = next(self._it)
        self.rows += self.global_batch
        return batch

    def get_state(self) -> dict:
        return {"rows": self.rows, "global_batch": self.global_batch}

    def set_state(self, state) -> None:
        if isinstance(state, bytes | str):
            state = json.loads(state)
        if "rows" in state:
            rows = int(state["rows"])
        elif "next_index" in state:
            rows = int(state["next_index"]) * int(state.get("global_batch", self.global_batch))
        else:
            raise ValueError(f"not a data position (no 'rows'): {state}")
        if rows < 0:
            raise ValueError(f"a data position counts rows from 0; got {rows}")
        self.rows, self._it = rows, None

    def start_prefetch(self) -> None:
        """Grain's handler calls this after a restore; the pipeline starts at next()."""
