"""Shared pieces of the LRA loaders: the source base class, padding, paths, bad records."""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("lrulm.data.lra")

ON_ERROR = ("raise", "skip")
SPLITS = ("train", "val", "test")
SKIP_HINT = "or set --config.data.on_error=skip to drop bad records and count them"
# How many bad records a warning or error names before it only counts.
_NAMED = 5


_STAND_IN_TRIES = 100  # records tried as the stand-in for an unreadable one


class LRASource:
    """A random-access source of fixed-length LRA records (grain's `RandomAccessDataSource`).

    Subclasses fill `task`, `split`, `path`, `seq_len`, `num_skipped` and `_size` in their
    constructor and implement `_record(index)`. Everything they store must be picklable
    (paths, numpy arrays), so that grain can ship the source to worker processes.
    """

    task: str
    split: str
    path: str
    seq_len: int
    num_skipped: int = 0
    on_error: str = "raise"
    _size: int = 0

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.read(index)[0]

    def read(self, index: int) -> tuple[dict[str, np.ndarray], bool]:
        """(record, True). A record that cannot be read (a file damaged after the source
        was listed) raises; with on_error="skip" it is logged and stands in as
        (the next readable record, False), which the trainer weighs 0."""
        index = operator.index(index)
        if not 0 <= index < self._size:
            raise IndexError(f"index {index} out of range for {self!r}")
        try:
            return self._record(index), True
        except ValueError as e:
            if self.on_error != "skip":
                raise ValueError(f"{e}; {SKIP_HINT}") from e
            log.warning("%s: skipped an unreadable record (on_error='skip'): %s", self, e)
            for step in range(1, min(self._size, _STAND_IN_TRIES)):
                try:
                    return self._record((index + step) % self._size), False
                except ValueError:
                    continue
            raise ValueError(
                f"{self!r}: record {index} and the {_STAND_IN_TRIES - 1} after it are all "
                "unreadable; check the files"
            ) from e

    def _record(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        # grain's checkpointing keys the iterator state on repr: keep it stable and exact.
        return (
            f"{type(self).__name__}(task={self.task!r}, split={self.split!r}, "
            f"path={self.path!r}, seq_len={self.seq_len}, len={self._size})"
        )


class BadRecords:
    """The on_error policy: raise at the first bad record, or skip and count them all."""

    def __init__(self, on_error: str, what: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"data.on_error={on_error!r}; use one of {ON_ERROR}")
        self.on_error = on_error
        self.what = what
        self.count = 0
        self._named: list[str] = []

    def bad(self, where: str, why: str, fix: str) -> None:
        """Reports one bad record.

        Args:
          where: the file and line (or record) of the bad record, e.g. "a.tsv, line 7".
          why: what is wrong with it.
          fix: what the user should do about it.

        Raises:
          ValueError: when on_error is "raise".
        """
        if self.on_error == "raise":
            raise ValueError(f"{where}: {why}. {fix[:1].upper()}{fix[1:]}; {SKIP_HINT}.")
        self.count += 1
        if len(self._named) < _NAMED:
            self._named.append(f"{where}: {why}")

    def finish(self) -> int:
        """Logs one warning naming the first few skipped records; returns how many."""
        if self.count:
            log.warning(
                "%s: skipped %d bad record(s) (on_error='skip'), first: %s",
                self.what,
                self.count,
                "; ".join(self._named),
            )
        return self.count


def check_args(split: str, on_error: str) -> None:
    """Rejects an unknown split or on_error, naming the valid ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r}; use one of {ON_ERROR}")


def check_nonempty(size: int, what: str, why: str) -> None:
    """An empty split would only fail later, inside the trainer: fail here instead."""
    if size == 0:
        raise ValueError(f"{what} has no records: {why}")


def check_seq_len(seq_len: int | None, default: int) -> int:
    """The record length: `seq_len` if given (a positive int), else the task's default."""
    if seq_len is None:
        return default
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r}; use a positive integer or None for {default}")
    return int(seq_len)


_SAID: set[str] = set()  # the paths `locate` has warned of (once each)


def locate(data_dir: str, candidates: Sequence[str], *, what: str, origin: str) -> str:
    """The first of `data_dir/<candidate>` that exists.

    Args:
      data_dir: the folder the user passed (`config.data.data_dir`).
      candidates: paths relative to `data_dir`, most preferred first.
      what: what is being looked for, for the message ("the ListOps train split").
      origin: where such files come from, for the message.

    Returns:
      The full path of the first candidate that exists (a warning names the others that
      exist too: data_dir holds two copies, e.g. generated files beside the release's;
      not the two copies the archive itself unpacks to).

    Raises:
      FileNotFoundError: naming every path tried and where the files come from.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))  # ~/lra as a shell would read it
    found = [
        (rel, path)
        for rel, path in (
            (rel, os.path.join(data_dir, rel) if rel else data_dir) for rel in candidates
        )
        if os.path.exists(path)
    ]
    # Both copies in the archive (its nested and top-level pathfinder): as it unpacks.
    archive = all(rel.startswith("lra_release") for rel, _ in found)
    found = [path for _, path in found]
    if found:
        if len(found) > 1 and not archive and found[0] not in _SAID:
            _SAID.add(found[0])
            log.warning(
                "%s: reading %s; data_dir also holds %s (ignored)", what, found[0],
                ", ".join(found[1:]),
            )  # fmt: skip
        return found[0]
    tried = ", ".join(os.path.join(data_dir, rel) for rel in candidates)
    exists = ""
    if os.path.isfile(data_dir):
        exists = f" (data_dir {data_dir!r} is a file; give the folder holding the task's files)"
    elif not os.path.isdir(data_dir):
        exists = f" (data_dir {data_dir!r} does not exist)"
    raise FileNotFoundError(
        f"{what}: expected {tried}{exists}. These come from {origin}; "
        "point data_dir at the folder that holds them."
    )


def pad(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncates or zero-pads token ids to `length`.

    Args:
      ids: int array (n,) of token ids, none of them 0 (0 is padding).
      length: the fixed record length L.

    Returns:
      inputs: int32 (L,), the ids then zeros; mask: bool (L,), True where inputs is an id.
    """
    n = min(len(ids), length)
    inputs = np.zeros(length, np.int32)
    inputs[:n] = ids[:n]
    mask = np.zeros(length, bool)
    mask[:n] = True
    return inputs, mask


def byte_ids(data: bytes, length: int) -> np.ndarray:
    """Byte-level token ids of at most `length` bytes: byte value + 1, so 0 stays padding."""
    return np.frombuffer(data[:length], np.uint8).astype(np.int32) + 1
