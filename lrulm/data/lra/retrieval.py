"""Retrieval (AAN): do two papers cite each other? Byte-level pairs from `new_aan_pairs.*.tsv`.

The released files have no header; each line is `label, id1, id2, text1, text2`,
tab-separated, with no quoting (LRA reads them with `use_quote_delim=False`, so quotes
are ordinary characters). Labels are written as `0`/`1` or `0.0`/`1.0`.
"""

from __future__ import annotations

import math
import os

import numpy as np

from lrulm.data.lra import common

NUM_CLASSES = 2
SEQ_LEN = 4000  # Bytes per document; a record holds both documents.
VOCAB_SIZE = 257  # Byte value + 1; 0 is padding.
FILES = {
    "train": "new_aan_pairs.train.tsv",
    "val": "new_aan_pairs.eval.tsv",
    "test": "new_aan_pairs.test.tsv",
}
NUM_COLUMNS = 5
_ORIGIN = "the lra_release archive (lra_release/tsv_data/new_aan_pairs.*.tsv)"


def parse_label(field: bytes) -> int | None:
    """The 0/1 label of a `label` field ("1", "0.0", ...), or None if it is anything else."""
    try:
        value = float(field)
    except ValueError:
        return None
    if not math.isfinite(value) or value not in (0.0, 1.0):
        return None
    return int(value)


class RetrievalSource(common.LRASource):
    """One split of AAN: {"inputs": int32 (2, L), "mask": bool (2, L), "label": int32}.

    The file (about 1 GB for train) is scanned once at construction to validate every
    line and remember where it starts; `__getitem__` reads one line back, so the source
    stays small to pickle.
    """

    def __init__(self, path: str, split: str, seq_len: int, on_error: str):
        self.task, self.split, self.path, self.seq_len = "retrieval", split, path, seq_len
        self.on_error = on_error
        bad = common.BadRecords(on_error, f"Retrieval {split} ({path})")
        fix = "each line must be label (0/1), id1, id2, text1, text2, tab-separated"
        starts, ends, labels = [], [], []
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                where = f"{path}, line {lineno}"
                # Count tabs rather than split: the documents are long and unneeded here.
                if (n_cols := line.count(b"\t") + 1) != NUM_COLUMNS:
                    bad.bad(where, f"{n_cols} tab-separated columns, expected 5", fix)
                    continue
                field = line[: line.index(b"\t")]
                if (label := parse_label(field)) is None:
                    bad.bad(where, f"label {field.decode(errors='replace')!r} is not 0 or 1", fix)
                    continue
                starts.append(start)
                ends.append(offset)
                labels.append(label)
        self.num_skipped = bad.finish()
        if not labels:
            raise ValueError(f"{path}: no Retrieval records; {fix}")
        self._starts = np.array(starts, np.int64)
        self._ends = np.array(ends, np.int64)
        self._labels = np.array(labels, np.int32)
        self._size = len(labels)

    def _record(self, index: int) -> dict[str, np.ndarray]:
        start, end = int(self._starts[index]), int(self._ends[index])
        with open(self.path, "rb") as f:
            f.seek(start)
            line = f.read(end - start)
        if line.count(b"\t") != NUM_COLUMNS - 1:
            raise ValueError(
                f"{self.path}: the line at byte {start} changed since the source was built; "
                "rebuild the source (the file must not change while training)"
            )
        _, _, _, text1, text2 = line.rstrip(b"\r\n").split(b"\t")
        inputs = np.zeros((2, self.seq_len), np.int32)
        mask = np.zeros((2, self.seq_len), bool)
        for row, text in enumerate((text1, text2)):
            inputs[row], mask[row] = common.pad(common.byte_ids(text, self.seq_len), self.seq_len)
        return {"inputs": inputs, "mask": mask, "label": self._labels[index]}


def load(
    data_dir: str, split: str, *, seq_len: int | None = None, on_error: str = "raise"
) -> RetrievalSource:
    """The AAN split `split` ("val" reads `new_aan_pairs.eval.tsv`).

    Args:
      data_dir: the folder holding `tsv_data/`, or the one holding the unpacked archive
        (`lra_release/lra_release/tsv_data/` or `lra_release/tsv_data/`), or the TSVs.
      split: "train", "val" or "test".
      seq_len: bytes per document L; default 4000. Longer documents are truncated.
      on_error: "raise" at the first malformed line, or "skip" and count them.

    Returns:
      A `RetrievalSource`; label 1 = the papers are linked by a citation.
    """
    common.check_args(split, on_error)
    name = FILES[split]
    path = common.locate(
        data_dir,
        [
            f"tsv_data/{name}",
            f"lra_release/lra_release/tsv_data/{name}",  # the archive's nested copy
            f"lra_release/tsv_data/{name}",
            name,
        ],
        what=f"Retrieval {split} split",
        origin=_ORIGIN,
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file; expected the AAN {split} TSV")
    return RetrievalSource(path, split, common.check_seq_len(seq_len, SEQ_LEN), on_error)
