"""ListOps: nested list operations as token sequences, from `listops-1000/basic_*.tsv`.

The released files have a header `Source\tTarget`, then one expression and its value
(0-9) per line, every application nested in its own parentheses: MAX(2, 9) is
`( ( ( [MAX 2 ) 9 ) ] )`. The parentheses carry no information the operator tokens and
`]` do not, so they are dropped (as S4 and S5 do): that record is `[MAX 2 9 ]`.
"""

from __future__ import annotations

import os

import numpy as np

from lrulm.data.lra import common

# Token ids: 0 is padding, then the digits and the operator tokens. Part of the contract.
TOKENS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "[MIN", "[MAX", "[MED", "[SM", "]")
VOCAB = {tok: i + 1 for i, tok in enumerate(TOKENS)}
VOCAB_SIZE = len(TOKENS) + 1
NUM_CLASSES = 10
SEQ_LEN = 2000  # LRA keeps expressions of fewer than 2000 tokens (parentheses not counted).
FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
HEADER = b"Source\tTarget"
_ORIGIN = "the lra_release archive (lra_release/listops-1000/) or tools/make_lra_data.py listops"

# Tokenising a whole line at C speed: each multi-character operator becomes one control
# byte, then a 256-entry table maps bytes to ids. A line of 2000 tokens and as many
# parentheses costs a few microseconds instead of a Python loop over 6000 words.
_OPERATORS = TOKENS[10:14]
_OP_BYTES = tuple((op.encode(), bytes([1 + i])) for i, op in enumerate(_OPERATORS))
_LUT = np.full(256, -1, np.int16)
_LUT[[ord(t) for t in TOKENS if len(t) == 1]] = [VOCAB[t] for t in TOKENS if len(t) == 1]
_LUT[[code[0] for _, code in _OP_BYTES]] = [VOCAB[op] for op in _OPERATORS]


def tokenize(source: bytes | str) -> np.ndarray:
    """Token ids of one ListOps expression, parentheses dropped.

    Args:
      source: the `Source` column, tokens separated by whitespace.

    Returns:
      uint8 array (n,) of ids in 1..VOCAB_SIZE-1.

    Raises:
      ValueError: naming the first token that is not a ListOps token.
    """
    raw = source.encode() if isinstance(source, str) else source
    ids = None
    if not any(code in raw for _, code in _OP_BYTES):  # Those bytes are ours.
        text = raw.translate(None, b"()")
        for word, code in _OP_BYTES:
            text = text.replace(word, code)
        arr = np.frombuffer(text, np.uint8)
        word = (arr != ord(" ")) & (arr != ord("\t"))
        # Every token is now one byte: two non-space bytes in a row are a bad token.
        if not (word[1:] & word[:-1]).any() and (_LUT[arr[word]] > 0).all():
            ids = _LUT[arr[word]].astype(np.uint8)
    if ids is None:
        words = raw.decode("utf-8", "replace").split()
        bad = next((w for w in words if w.strip("()") and w.strip("()") not in VOCAB), "?")
        raise ValueError(f"unknown token {bad!r} (ListOps tokens are {' '.join(TOKENS)} ( ))")
    if not len(ids):
        raise ValueError("empty expression")
    return ids


class ListOpsSource(common.LRASource):
    """One split of ListOps: records {"inputs": int32 (L,), "mask": bool (L,), "label": int32}.

    The file is parsed once at construction into one flat uint8 token array (~100 MB
    of ids for the 96k training expressions of about 1,000 tokens each).
    """

    def __init__(self, path: str, split: str, seq_len: int, on_error: str):
        self.task, self.split, self.path, self.seq_len = "listops", split, path, seq_len
        self.on_error = on_error
        bad = common.BadRecords(on_error, f"ListOps {split} ({path})")
        chunks, labels = [], []
        fix = "each line must be an expression, a tab, and its value 0-9"
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip(b"\r\n")
                if lineno == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                if (lineno == 1 and line == HEADER) or not line.strip():
                    continue
                where = f"{path}, line {lineno}"
                cols = line.split(b"\t")
                if len(cols) != 2:
                    bad.bad(where, f"{len(cols)} tab-separated columns, expected 2", fix)
                    continue
                try:
                    label = int(cols[1])
                except ValueError:
                    bad.bad(where, f"label {cols[1].decode(errors='replace')!r} is not an int", fix)
                    continue
                if not 0 <= label < NUM_CLASSES:
                    bad.bad(where, f"label {label} is outside 0-{NUM_CLASSES - 1}", fix)
                    continue
                try:
                    ids = tokenize(cols[0])
                except ValueError as e:
                    bad.bad(where, str(e), fix)
                    continue
                chunks.append(ids)
                labels.append(label)
        self.num_skipped = bad.finish()
        if not labels:
            raise ValueError(f"{path}: no ListOps records; {fix}")
        lengths = np.array([len(c) for c in chunks], np.int64)
        self._tokens = np.concatenate(chunks)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._labels = np.array(labels, np.int32)
        self._size = len(labels)
        if (n_long := int((lengths > seq_len).sum())) > 0:
            common.log.warning(
                "ListOps %s: %d of %d expressions are longer than seq_len=%d and are "
                "truncated (longest %d); raise seq_len to keep them whole",
                split,
                n_long,
                self._size,
                seq_len,
                lengths.max(),
            )

    def _record(self, index: int) -> dict[str, np.ndarray]:
        ids = self._tokens[self._starts[index] : self._starts[index + 1]]
        inputs, mask = common.pad(ids, self.seq_len)
        return {"inputs": inputs, "mask": mask, "label": self._labels[index]}


def load(
    data_dir: str, split: str, *, seq_len: int | None = None, on_error: str = "raise"
) -> ListOpsSource:
    """The ListOps split `split` from `data_dir/listops-1000/basic_{split}.tsv`.

    Args:
      data_dir: the folder holding `listops-1000/`, or the one holding the unpacked
        archive (`lra_release/lra_release/listops-1000/` or `lra_release/listops-1000/`),
        or the `basic_*.tsv` files themselves.
      split: "train", "val" or "test".
      seq_len: record length L; default 2000. Longer expressions are truncated (warned).
      on_error: "raise" at the first malformed line, or "skip" and count them.

    Returns:
      A `ListOpsSource`.
    """
    common.check_args(split, on_error)
    name = FILES[split]
    path = common.locate(
        data_dir,
        [
            f"listops-1000/{name}",
            f"lra_release/lra_release/listops-1000/{name}",  # the archive's nested copy
            f"lra_release/listops-1000/{name}",
            name,
        ],
        what=f"ListOps {split} split",
        origin=_ORIGIN,
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file; expected the ListOps {split} TSV")
    return ListOpsSource(path, split, common.check_seq_len(seq_len, SEQ_LEN), on_error)
