"""Long Range Arena data: the six tasks, read from their released on-disk formats.

    source = load_split("listops", "/data/lra_release", "train")
    source[0]  # {"inputs": int32 (2000,), "mask": bool (2000,), "label": int32 ()}

Every source is a grain random-access source (`__len__`, `__getitem__`), deterministic
and picklable, whose records are dicts of numpy arrays padded to a fixed length L:

- token tasks (listops, text): inputs int32 (L,) with 0 = padding, mask bool (L,).
- retrieval: inputs int32 (2, L), mask bool (2, L): the two documents.
- pixel tasks (image, pathfinder, pathx): inputs float32 (L, 1), mask all True (L,).
- every task: label int32 ().
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from lrulm.data.lra import common, image, listops, pathfinder, retrieval, text
from lrulm.data.lra.common import LRASource

__all__ = ["SPLITS", "TASKS", "LRASource", "TaskSpec", "load_split"]

SPLITS = common.SPLITS


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about an LRA task.

    Attributes:
      name: the task's name in `TASKS`.
      num_classes: number of labels.
      seq_len: the paper's sequence length (per document for retrieval).
      vocab_size: token ids are in [0, vocab_size), 0 = padding; None for pixel tasks.
      input_channels: features per step for pixel tasks (1, grayscale); None for tokens.
      dual: True if a record holds two sequences to compare (retrieval).
      splits: the split names `load_split` accepts.
    """

    name: str
    num_classes: int
    seq_len: int
    vocab_size: int | None
    input_channels: int | None
    dual: bool = False
    splits: tuple[str, ...] = SPLITS


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("listops", listops.NUM_CLASSES, listops.SEQ_LEN, listops.VOCAB_SIZE, None),
        TaskSpec("text", text.NUM_CLASSES, text.SEQ_LEN, text.VOCAB_SIZE, None),
        TaskSpec(
            "retrieval", retrieval.NUM_CLASSES, retrieval.SEQ_LEN, retrieval.VOCAB_SIZE, None, True
        ),
        TaskSpec("image", image.NUM_CLASSES, image.SEQ_LEN, None, 1),
        TaskSpec("pathfinder", pathfinder.NUM_CLASSES, 32 * 32, None, 1),
        TaskSpec("pathx", pathfinder.NUM_CLASSES, 128 * 128, None, 1),
    )
}

_LOADERS: dict[str, Callable[..., LRASource]] = {
    "listops": listops.load,
    "text": text.load,
    "retrieval": retrieval.load,
    "image": image.load,
    "pathfinder": functools.partial(pathfinder.load, task="pathfinder"),
    "pathx": functools.partial(pathfinder.load, task="pathx"),
}


def load_split(
    task: str,
    data_dir: str,
    split: str,
    *,
    seq_len: int | None = None,
    on_error: str = "raise",
) -> LRASource:
    """One split of one LRA task, read from the files as released.

    Args:
      task: one of `TASKS`: listops, text, retrieval, image, pathfinder, pathx.
      data_dir: the folder holding the unpacked data (see each task's module for the
        layout it expects; e.g. `listops-1000/basic_train.tsv` for listops).
      split: "train", "val" or "test".
      seq_len: record length L; None for the paper's (`TASKS[task].seq_len`). Token
        sequences are truncated or padded to it; pixel tasks accept only their size.
      on_error: "raise" on the first malformed record, or "skip" to drop bad records;
        `source.num_skipped` counts them and a warning names the first few.

    Returns:
      A random-access source of padded records (see the module docstring).

    Raises:
      ValueError: unknown task, split or on_error, or malformed data (file and line named).
      FileNotFoundError: the expected files are missing (the expected path named).
    """
    if task not in TASKS:
        raise ValueError(f"unknown LRA task {task!r}; use one of {', '.join(TASKS)}")
    if split not in TASKS[task].splits:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(TASKS[task].splits)}")
    common.check_args(split, on_error)
    return _LOADERS[task](data_dir, split, seq_len=seq_len, on_error=on_error)
