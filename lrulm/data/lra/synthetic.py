"""Small synthetic LRA data sets in the exact released on-disk layouts (smoke runs, tests).

Each `write_*(data_dir, ...)` writes under `data_dir` the files `load_split` reads for
one task and returns what it wrote, so a test can compare records with their source.
The content is random (reviews of random words, random images): it exercises the whole
pipeline but teaches nothing; for real ListOps / Pathfinder data use
`lrulm.data.lra.generate`. These writers build their content independently of it.
`python tools/make_lra_data.py synthetic --task text --out DIR` runs them.
"""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
_OPS = ("[MIN", "[MAX", "[MED", "[SM")


def _expression(rng: random.Random, depth: int, max_depth: int) -> tuple[str, int]:
    """A random ListOps expression in released form, and its value."""
    if depth >= max_depth or rng.random() < 0.4:
        v = rng.randrange(10)
        return str(v), v
    op = rng.choice(_OPS)
    args = [_expression(rng, depth + 1, max_depth) for _ in range(rng.randint(2, 4))]
    vals = sorted(v for _, v in args)
    n = len(vals)
    value = {
        "[MIN": vals[0],
        "[MAX": vals[-1],
        "[MED": vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) // 2,
        "[SM": sum(vals) % 10,
    }[op]
    # ((((op a1) a2) ...) ]): every application in its own parentheses, as released.
    text = "( " * n + "( " + op + "".join(f" {s} )" for s, _ in args) + " ] )"
    return text, value


def write_listops(
    data_dir: str,
    rows: dict[str, list[tuple[str, object]]] | None = None,
    *,
    num: int = 6,
    seed: int = 0,
) -> dict[str, list[tuple[str, object]]]:
    """Writes `listops-1000/basic_{train,val,test}.tsv` (header `Source\\tTarget`).

    Args:
      data_dir: where to write.
      rows: {split: [(source, target), ...]} to write verbatim; default `num` random
        expressions per split (operators nested up to depth 4, targets their values).
      num: random expressions per split when `rows` is None.
      seed: the random seed.

    Returns:
      {split: [(source, target), ...]} as written.
    """
    rng = random.Random(seed)
    if rows is None:
        rows = {s: [_expression(rng, 0, 4) for _ in range(num)] for s in SPLITS}
    folder = os.path.join(data_dir, "listops-1000")
    os.makedirs(folder, exist_ok=True)
    for split, split_rows in rows.items():
        with open(os.path.join(folder, f"basic_{split}.tsv"), "w") as f:
            f.write("Source\tTarget\n")
            f.writelines(f"{source}\t{target}\n" for source, target in split_rows)
    return rows


def _review(rng: random.Random, label: int) -> str:
    words = ["great", "film", "awful", "plot", "naïve", "acting", "café", "—", "<br />", "!"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + f" ({label})"


def write_imdb(
    data_dir: str, *, num_per_class: int = 3, seed: int = 0, long_review: bool = True
) -> dict[str, list[tuple[str, str, int]]]:
    """Writes `aclImdb/{train,test}/{neg,pos}/<id>_<rating>.txt` (UTF-8 reviews).

    Args:
      data_dir: where to write.
      num_per_class: reviews per class and split.
      seed: the random seed.
      long_review: make the first positive training review 5,000 bytes (> 4096).

    Returns:
      {"train"/"test": [(path relative to aclImdb/<split>, text, label), ...]}, neg then
      pos, each sorted by file name (the loader's records are in a fixed permutation of
      this order: match them by `TextSource.files`).
    """
    rng = random.Random(seed)
    written = {}
    for split in ("train", "test"):
        written[split] = []
        for name, label in (("neg", 0), ("pos", 1)):
            folder = os.path.join(data_dir, "aclImdb", split, name)
            os.makedirs(folder, exist_ok=True)
            files = []
            for i in range(num_per_class):
                text = _review(rng, label)
                if long_review and split == "train" and label == 1 and i == 0:
                    text = ("x" * 4095 + "é" + "y" * 1000)[:5000]
                rating = rng.randint(7, 10) if label else rng.randint(1, 4)
                fname = f"{i}_{rating}.txt"
                with open(os.path.join(folder, fname), "w", encoding="utf-8") as f:
                    f.write(text)
                files.append((f"{name}/{fname}", text, label))
            written[split] += sorted(files)
        # The archive also has these beside the class folders; loaders must ignore them.
        with open(os.path.join(data_dir, "aclImdb", split, "urls_pos.txt"), "w") as f:
            f.write("http://example.com\n")
    return written


def write_aan(
    data_dir: str,
    rows: dict[str, list[tuple[str, ...]]] | None = None,
    *,
    num: int = 4,
    seed: int = 0,
) -> dict[str, list[tuple[str, ...]]]:
    """Writes `tsv_data/new_aan_pairs.{train,eval,test}.tsv`: label, id1, id2, text1, text2.

    Args:
      data_dir: where to write.
      rows: {split: [(label, id1, id2, text1, text2), ...]} ("val" goes to the eval
        file), written verbatim; default `num` random pairs per split, labels written
        as "0"/"1" and "0.0"/"1.0" alternately, the first train text 4,500 bytes long.
      num: random pairs per split when `rows` is None.
      seed: the random seed.

    Returns:
      {split: rows} as written.
    """
    rng = random.Random(seed)
    if rows is None:
        rows = {}
        for split in SPLITS:
            rows[split] = []
            for i in range(num):
                label = rng.randrange(2)
                texts = [
                    " ".join(rng.choice(["model", '"quoted"', "ß", "parse"]) for _ in range(9))
                    for _ in range(2)
                ]
                if split == "train" and i == 0:
                    texts[0] = "a" * 4500
                field = f"{label}.0" if i % 2 else str(label)
                rows[split].append((field, f"P{i}-a", f"P{i}-b", *texts))
    folder = os.path.join(data_dir, "tsv_data")
    os.makedirs(folder, exist_ok=True)
    for split, split_rows in rows.items():
        name = {"train": "train", "val": "eval", "test": "test"}[split]
        with open(os.path.join(folder, f"new_aan_pairs.{name}.tsv"), "w", encoding="utf-8") as f:
            f.writelines("\t".join(r) + "\n" for r in split_rows)
    return rows


def write_cifar(
    data_dir: str, *, num_per_batch: int = 10, num_test: int = 10, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes `cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}` pickles.

    Args:
      data_dir: where to write.
      num_per_batch: images in each of the five training batches.
      num_test: images in test_batch.
      seed: the random seed.

    Returns:
      {"train": (data uint8 (5 * num_per_batch, 3072), labels int (n,)), "test": (...)},
      data channel-major RGB rows as in the files.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = num_test if name == "test_batch" else num_per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)  # As released (written by Python 2).
        key = "test" if name == "test_batch" else "train"
        prev = out.get(key, (np.zeros((0, 3072), np.uint8), np.zeros(0, np.int64)))
        out[key] = (np.concatenate([prev[0], data]), np.concatenate([prev[1], labels]))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, f, protocol=2)
    return out


def write_pathfinder(
    data_dir: str,
    resolution: int = 32,
    *,
    num: int = 20,
    per_folder: int = 8,
    seed: int = 0,
    nested: bool = False,
    difficulty: str = "curv_contour_length_14",
) -> list[tuple[str, int, np.ndarray]]:
    """Writes `pathfinder{res}/<difficulty>/{imgs/<k>/sample_<i>.png, metadata/<k>.npy}`.

    The images are random gray noise (loaders do not look at content); the metadata is
    plain text in the released field layout (field 3 the label).

    Args:
      data_dir: where to write.
      resolution: image side (32 Pathfinder, 128 Path-X).
      num: number of images; labels alternate 1, 0, ... .
      per_folder: images per `imgs/<k>` folder.
      seed: the random seed.
      nested: write under `lra_release/lra_release/`, as the archive unpacks.
      difficulty: the dataset folder name.

    Returns:
      [(path relative to the difficulty folder, label, pixels uint8 (res, res)), ...].
    """
    rng = np.random.default_rng(seed)
    base = os.path.join(data_dir, "lra_release", "lra_release") if nested else data_dir
    root = os.path.join(base, f"pathfinder{resolution}", difficulty)
    os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
    written = []
    for k in range((num + per_folder - 1) // per_folder):
        os.makedirs(os.path.join(root, "imgs", str(k)), exist_ok=True)
        lines = []
        for i in range(min(per_folder, num - k * per_folder)):
            label = 1 - (k * per_folder + i) % 2
            pixels = rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(os.path.join(root, "imgs", str(k), f"sample_{i}.png"))
            lines.append(f"imgs/{k} sample_{i}.png {i} {label} 14 1.5 1.0 1\n")
            written.append((f"imgs/{k}/sample_{i}.png", label, pixels))
        with open(os.path.join(root, "metadata", f"{k}.npy"), "w") as f:
            f.writelines(lines)
    return written


def write_all(data_dir: str, *, seed: int = 0) -> dict[str, object]:
    """Writes a tiny copy of all six tasks under `data_dir`; returns {task: written}."""
    return {
        "listops": write_listops(data_dir, num=12, seed=seed),
        "text": write_imdb(data_dir, num_per_class=6, seed=seed),
        "retrieval": write_aan(data_dir, num=8, seed=seed),
        "image": write_cifar(data_dir, seed=seed),
        "pathfinder": write_pathfinder(data_dir, 32, num=40, seed=seed),
        "pathx": write_pathfinder(data_dir, 128, num=20, seed=seed),
    }
