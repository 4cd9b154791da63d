"""Text (IMDB reviews): byte-level sentiment classification from the `aclImdb` layout.

IMDB has no validation split. As in the LRA release and the S4/S5 code, "train" is
`aclImdb/train/{neg,pos}` (25,000 reviews) and both "val" and "test" are `aclImdb/test`
(25,000 reviews), so validation accuracy *is* test accuracy for this task.
"""

from __future__ import annotations

import os

import numpy as np

from lrulm.data.lra import common

NUM_CLASSES = 2
SEQ_LEN = 4096
VOCAB_SIZE = 257  # Byte value + 1; 0 is padding.
SPLIT_DIRS = {"train": "train", "val": "test", "test": "test"}
LABELS = (("neg", 0), ("pos", 1))
_ORDER_SEED = 0x1DB  # fixed forever: the record order of every split
_ORIGIN = "the Large Movie Review Dataset (aclImdb_v1.tar.gz, unpacked: aclImdb/{train,test}/...)"


class TextSource(common.LRASource):
    """One split of IMDB: records {"inputs": int32 (L,), "mask": bool (L,), "label": int32}.

    Record order: the `neg/*.txt` and `pos/*.txt` files (each list sorted by name) in one
    fixed permutation, so that any first part of the split (an evaluation with
    `train.eval_steps > 0`) holds both classes. Files are listed at construction and read
    in `__getitem__`.

    Attributes:
      files: the split's reviews, relative to `path` ("neg/0_3.txt"), in record order.
    """

    def __init__(self, root: str, split: str, seq_len: int, on_error: str):
        self.task, self.split, self.seq_len = "text", split, seq_len
        self.on_error = on_error
        self.path = os.path.join(root, SPLIT_DIRS[split])
        bad = common.BadRecords(on_error, f"Text {split} ({self.path})")
        files, labels = [], []
        for name, label in LABELS:
            folder = os.path.join(self.path, name)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"Text {split} split: expected the folder {folder} of *.txt reviews; "
                    f"these come from {_ORIGIN}"
                )
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if e.name.endswith(".txt")), key=lambda e: e.name)
            if not entries:
                raise FileNotFoundError(f"{folder} holds no *.txt reviews; re-extract {_ORIGIN}")
            for entry in entries:
                if not entry.is_file():
                    bad.bad(entry.path, "not a file", "remove it")
                    continue
                if entry.stat().st_size == 0:
                    bad.bad(entry.path, "empty review", "re-extract the archive or delete it")
                    continue
                files.append(os.path.join(name, entry.name))
                labels.append(label)
        self.num_skipped = bad.finish()
        common.check_nonempty(len(files), f"Text {split} ({self.path})", "every review skipped")
        order = np.random.default_rng(_ORDER_SEED).permutation(len(files))
        self.files = [files[i] for i in order]
        self._labels = np.array(labels, np.int32)[order]
        self._size = len(files)

    def _record(self, index: int) -> dict[str, np.ndarray]:
        path = os.path.join(self.path, self.files[index])
        try:
            with open(path, "rb") as f:
                data = f.read(self.seq_len)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the review ({e}); re-extract it") from e
        inputs, mask = common.pad(common.byte_ids(data, self.seq_len), self.seq_len)
        return {"inputs": inputs, "mask": mask, "label": self._labels[index]}


def load(
    data_dir: str, split: str, *, seq_len: int | None = None, on_error: str = "raise"
) -> TextSource:
    """The IMDB split `split`, byte-level: the first L bytes of each review's UTF-8 text.

    Args:
      data_dir: the folder holding `aclImdb/` (or `aclImdb` itself).
      split: "train" (aclImdb/train), "val" or "test" (both aclImdb/test; IMDB has no
        validation split).
      seq_len: record length L in bytes; default 4096. Longer reviews are truncated.
      on_error: "raise" at the first bad review (an empty file), or "skip" and count them.

    Returns:
      A `TextSource`; label 1 = positive, 0 = negative.
    """
    common.check_args(split, on_error)
    split_dir = SPLIT_DIRS[split]
    found = common.locate(
        data_dir,
        [f"aclImdb/{split_dir}", split_dir],
        what=f"Text {split} split",
        origin=_ORIGIN,
    )
    return TextSource(
        os.path.dirname(found), split, common.check_seq_len(seq_len, SEQ_LEN), on_error
    )
