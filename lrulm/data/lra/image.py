"""Image (sequential CIFAR-10): 1024 grayscale pixels in row-major order, 10 classes.

Reads the standard `cifar-10-batches-py` pickles. Splits: "train" is the first 45,000
training images (data_batch_1..4 and the first 5,000 of data_batch_5), "val" the last
5,000 (in general: the last tenth of the training images), "test" is `test_batch`.

Grayscale is the ITU-R 601 luma L = 0.299 R + 0.587 G + 0.114 B, rounded to uint8
exactly as PIL's `convert("L")` (and so torchvision's `Grayscale`, which S4/S5 use)
does. Pixels are then normalised with fixed grayscale CIFAR-10 statistics: mean 122.6,
std 61.0 (0-255 units; S4's `cifar10_grayscale_normalization`). The mean agrees with
the published per-channel training means (0.4914, 0.4822, 0.4465) under the luma
weights: 0.4809 * 255 = 122.6. `gray_stats` recomputes both from the files.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from lrulm.data.lra import common

NUM_CLASSES = 10
SEQ_LEN = 1024
GRAY_MEAN = 122.6
GRAY_STD = 61.0
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
VAL_FRACTION = 0.1  # 5,000 of the 50,000 training images.
_ORIGIN = "CIFAR-10 for Python (cifar-10-python.tar.gz, unpacked: cifar-10-batches-py/)"

# The pickles are untrusted input: allow only what a CIFAR batch holds (numpy arrays,
# bytes), not arbitrary callables.
_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core", "numpy._core")  # Pickled by numpy < 2.
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """Grayscale pixels, as PIL's convert("L").

    Args:
      rgb: uint8 (n, 3072), each row a CIFAR image channel-major: 1024 R, 1024 G, 1024 B.

    Returns:
      uint8 (n, 1024), row-major pixels.
    """
    r, g, b = (rgb[:, i * 1024 : (i + 1) * 1024].astype(np.uint32) for i in range(3))
    # PIL's fixed-point luma: weights 0.299, 0.587, 0.114 in 16 bits, rounded.
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def read_batch(path: str, bad: common.BadRecords) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale images uint8 (n, 1024) and labels int32 (n,) of one CIFAR batch file."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"expected the CIFAR-10 batch {path}; it comes from {_ORIGIN}"
        ) from None
    except (OSError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as e:
        raise ValueError(
            f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
            f"re-extract it from {_ORIGIN}"
        ) from e
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (n, 3072); "
            f"re-extract it from {_ORIGIN}"
        )
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: b'labels' is {labels.dtype} {labels.shape}, expected {len(data)} "
            f"integers; re-extract it from {_ORIGIN}"
        )
    keep = np.ones(len(data), bool)
    fix = "re-extract the batch"
    for i in np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES)):
        bad.bad(f"{path}, image {i}", f"label {labels[i]} is outside 0-9", fix)
        keep[i] = False
    return to_gray(data[keep]), labels[keep].astype(np.int32)


def gray_stats(data_dir: str) -> tuple[float, float]:
    """Mean and std (0-255 units) of every grayscale pixel of the 50,000 training images."""
    root = _root(data_dir, "train")
    bad = common.BadRecords("raise", "CIFAR-10")
    gray = np.concatenate([read_batch(os.path.join(root, n), bad)[0] for n in TRAIN_FILES])
    return float(gray.mean(dtype=np.float64)), float(gray.std(dtype=np.float64))


class ImageSource(common.LRASource):
    """One split of sCIFAR: {"inputs": float32 (1024, 1), "mask": bool (1024,), "label"}.

    The grayscale images are held in memory as uint8 (46 MB for the 45,000 train images).
    """

    def __init__(self, root: str, split: str, on_error: str):
        self.task, self.split, self.path, self.seq_len = "image", split, root, SEQ_LEN
        self.on_error = on_error
        bad = common.BadRecords(on_error, f"Image {split} ({root})")
        files = TEST_FILES if split == "test" else TRAIN_FILES
        parts = [read_batch(os.path.join(root, name), bad) for name in files]
        gray = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if split != "test":
            cut = len(gray) - max(1, round(len(gray) * VAL_FRACTION))
            part = slice(None, cut) if split == "train" else slice(cut, None)
            gray, labels = gray[part], labels[part]
        self.num_skipped = bad.finish()
        common.check_nonempty(len(labels), f"Image {split} ({root})", "too few images")
        self._gray = gray
        self._labels = labels
        self._size = len(labels)

    def _record(self, index: int) -> dict[str, np.ndarray]:
        x = (self._gray[index].astype(np.float32) - GRAY_MEAN) / GRAY_STD
        return {
            "inputs": x[:, None],
            "mask": np.ones(SEQ_LEN, bool),
            "label": self._labels[index],
        }


def _root(data_dir: str, split: str) -> str:
    first = (TEST_FILES if split == "test" else TRAIN_FILES)[0]
    found = common.locate(
        data_dir,
        [f"cifar-10-batches-py/{first}", first],
        what=f"Image {split} split",
        origin=_ORIGIN,
    )
    return os.path.dirname(found)


def load(
    data_dir: str, split: str, *, seq_len: int | None = None, on_error: str = "raise"
) -> ImageSource:
    """The sequential grayscale CIFAR-10 split `split`.

    Args:
      data_dir: the folder holding `cifar-10-batches-py/` (or the batch files themselves).
      split: "train" (first 45,000 training images), "val" (last 5,000) or "test".
      seq_len: must be None or 1024: an image is 1024 pixels, never padded or cut.
      on_error: "raise" at the first bad label, or "skip" and count them.

    Returns:
      An `ImageSource`.
    """
    common.check_args(split, on_error)
    if common.check_seq_len(seq_len, SEQ_LEN) != SEQ_LEN:
        raise ValueError(f"seq_len={seq_len} for Image; a CIFAR image is {SEQ_LEN} pixels")
    return ImageSource(_root(data_dir, split), split, on_error)
