"""Pathfinder (32x32) and Path-X (128x128): are the two dots joined by one dashed path?

Layout (the lra_release archive): `pathfinder{32,128}/curv_contour_length_14/` holds
`imgs/<k>/sample_<i>.png` and `metadata/<k>.npy`. Despite the suffix the metadata files
are plain text, one line per image, whitespace-separated: field 0 the folder
(`imgs/0`), field 1 the file name, field 3 the label. (A real `.npy` string array with
the same rows is read too.) The archive unpacks to `lra_release/lra_release/pathfinder*`
as well as a broken top-level copy, so the nested copy is preferred when both exist.

There are no released splits: all images listed are split 80/10/10 into train/val/test
by a permutation with a fixed seed, so every run and every host sees the same split.
Pixels are scaled from 0..255 to [-1, 1].
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from lrulm.data.lra import common

NUM_CLASSES = 2
RESOLUTIONS = {"pathfinder": 32, "pathx": 128}
DIFFICULTY = "curv_contour_length_14"  # The hardest setting; the one LRA uses.
SPLIT_SEED = 0x5EED  # Fixed forever: changing it reshuffles every split.
SPLIT_TENTHS = {"train": 8, "val": 1, "test": 1}  # Integer arithmetic: no rounding surprises.
_NPY_MAGIC = b"\x93NUMPY"


def candidates(resolution: int, difficulty: str = DIFFICULTY) -> list[str]:
    """Where the images may be under data_dir, most preferred (the nested copy) first."""
    sub = f"pathfinder{resolution}/{difficulty}"
    return [f"lra_release/lra_release/{sub}", f"lra_release/{sub}", sub]


def _archive_top_level(root: str, resolution: int) -> bool:
    """Whether root (.../pathfinder128/<difficulty>) is the lra_release archive's broken
    top-level Path-X copy, `lra_release/pathfinder128`, rather than the nested
    `lra_release/lra_release/pathfinder128` (the archive's 32x32 copies are both whole)."""
    parent = os.path.dirname(os.path.dirname(os.path.abspath(root)))
    return (
        resolution == 128
        and os.path.basename(parent) == "lra_release"
        and os.path.basename(os.path.dirname(parent)) != "lra_release"
    )


def read_metadata(path: str) -> list[list[str]]:
    """The whitespace-separated fields of each line of one metadata file (blank lines kept)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(_NPY_MAGIC):
        try:
            with open(path, "rb") as f:
                rows = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(
                f"{path}: not a readable .npy array of strings ({e}); the release's metadata "
                "is text lines 'imgs/<k> sample_<i>.png <label> ...' or such an array"
            ) from None
        return [[str(x) for x in np.atleast_1d(row)] for row in np.atleast_2d(rows)]
    return [line.split() for line in raw.decode("utf-8", "replace").splitlines()]


def _metadata_files(root: str) -> list[str]:
    folder = os.path.join(root, "metadata")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"expected {folder}/<k>.npy (plain-text metadata, one line per image) "
            "from the lra_release archive"
        )
    names = [n for n in os.listdir(folder) if n.endswith(".npy")]
    if not names:
        raise FileNotFoundError(f"{folder} holds no <k>.npy metadata files; re-extract it")

    def key(name: str):  # 0.npy, 1.npy, ..., 10.npy: numeric order, then anything else.
        stem = name[: -len(".npy")]
        return (0, int(stem), "") if re.fullmatch(r"\d+", stem) else (1, 0, stem)

    return [os.path.join(folder, n) for n in sorted(names, key=key)]


class PathfinderSource(common.LRASource):
    """One split: {"inputs": float32 (res*res, 1), "mask": bool (res*res,), "label": int32}.

    The metadata is parsed and the image folders listed at construction (so a missing
    image is reported at once); PNGs are decoded in `__getitem__`.

    Attributes:
      images: the split's image paths, relative to `path`, in record order.
    """

    def __init__(self, root: str, task: str, split: str, resolution: int, on_error: str):
        self.task, self.split, self.path = task, split, root
        self.on_error = on_error
        self.resolution = resolution
        self.seq_len = resolution * resolution
        bad = common.BadRecords(on_error, f"{task} {split} ({root})")
        line_fix = "each metadata line is: folder, file name, index, label (0/1), ..."
        image_fix = "re-extract the archive, or delete the image's metadata line"
        if _archive_top_level(root, resolution):  # chosen for want of the nested copy
            image_fix = (
                f"this looks like the lra_release archive's top-level pathfinder{resolution} "
                f"copy, which is broken; the good one is lra_release/lra_release/"
                f"pathfinder{resolution}: extract it beside this one (data.data_dir stays "
                "the folder holding lra_release/)"
            )
        listings: dict[str, dict[str, os.DirEntry]] = {}
        slots: list[tuple[str, int]] = []  # (image relative to root, label) per line.
        problems: dict[int, tuple[str, str, str]] = {}  # slot -> (where, why, fix)
        for meta in _metadata_files(root):
            for lineno, fields in enumerate(read_metadata(meta), 1):
                if not fields:
                    continue
                where, why, fix = f"{meta}, line {lineno}", None, line_fix
                if len(fields) < 4:
                    why = f"{len(fields)} fields, expected at least 4"
                elif fields[3] not in ("0", "1"):
                    why = f"label {fields[3]!r} is not 0 or 1"
                else:
                    folder = fields[0]
                    if folder not in listings:
                        full = os.path.join(root, folder)
                        listings[folder] = (
                            {e.name: e for e in os.scandir(full)} if os.path.isdir(full) else {}
                        )
                    image = os.path.join(root, folder, fields[1])
                    entry = listings[folder].get(fields[1])
                    # An empty file (the release has some) would fail only when first drawn.
                    fix = image_fix
                    if entry is None:
                        why = f"the image {image} does not exist"
                    elif entry.stat().st_size == 0:
                        why = f"the image {image} is empty"
                if why is not None:
                    problems[len(slots)] = (where, why, fix)
                    slots.append(("", -1))
                else:
                    slots.append((f"{fields[0]}/{fields[1]}", int(fields[3])))
        if not slots:
            raise ValueError(f"{root}/metadata lists no images; re-extract it")
        if problems and on_error == "raise":  # Whichever split the bad line falls in.
            bad.bad(*problems[min(problems)])
        # Bad lines keep their slot in the permutation, so skipping them moves no other
        # image to another split.
        order = np.random.default_rng(SPLIT_SEED).permutation(len(slots))
        n_train = len(slots) * SPLIT_TENTHS["train"] // 10
        n_val = len(slots) * SPLIT_TENTHS["val"] // 10
        lo, hi = {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, len(slots)),
        }[split]
        images, labels = [], []
        for slot in order[lo:hi]:
            if slot in problems:
                bad.bad(*problems[slot])
                continue
            images.append(slots[slot][0])
            labels.append(slots[slot][1])
        self.num_skipped = bad.finish()
        common.check_nonempty(
            len(images), f"{task} {split} ({root})", f"{len(slots)} metadata lines in all"
        )
        self.images = images
        self._labels = np.array(labels, np.int32)
        self._size = len(images)

    def _record(self, index: int) -> dict[str, np.ndarray]:
        path = os.path.join(self.path, self.images[index])
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("L"))
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(
                f"{path}: unreadable image ({type(e).__name__}: {e}); re-extract it, or "
                "delete its metadata line"
            ) from e
        if pixels.shape != (self.resolution, self.resolution):
            raise ValueError(
                f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                f"{self.resolution}x{self.resolution} for {self.task}"
            )
        x = pixels.reshape(-1, 1).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return {"inputs": x, "mask": np.ones(self.seq_len, bool), "label": self._labels[index]}


def load(
    data_dir: str,
    split: str,
    *,
    task: str = "pathfinder",
    seq_len: int | None = None,
    on_error: str = "raise",
    difficulty: str = DIFFICULTY,
) -> PathfinderSource:
    """The Pathfinder (`task="pathfinder"`, 32x32) or Path-X (`"pathx"`, 128x128) split.

    Args:
      data_dir: the folder holding `pathfinder{32,128}/` (or `lra_release/...`, or
        `lra_release/lra_release/...`, which is preferred).
      split: "train", "val" or "test" (80/10/10 of all images, fixed seed).
      task: "pathfinder" or "pathx".
      seq_len: must be None or resolution**2 (1024 or 16384): images are never cut.
      on_error: "raise" at the first bad metadata line or missing image, or "skip" and
        count them.
      difficulty: the dataset folder; LRA uses `curv_contour_length_14`.

    Returns:
      A `PathfinderSource`.
    """
    common.check_args(split, on_error)
    resolution = RESOLUTIONS[task]
    if common.check_seq_len(seq_len, resolution**2) != resolution**2:
        raise ValueError(
            f"seq_len={seq_len} for {task}; a {resolution}x{resolution} image is "
            f"{resolution**2} pixels"
        )
    root = common.locate(
        data_dir,
        candidates(resolution, difficulty),
        what=f"{task} {split} split",
        origin="the lra_release archive (lra_release/lra_release/pathfinder*) or "
        "tools/make_lra_data.py pathfinder",
    )
    common.log.info("%s: reading %s", task, root)
    return PathfinderSource(root, task, split, resolution, on_error)
