"""Generators for LRA-format data: ListOps expressions and Pathfinder images, seeded.

Both write the released on-disk layout, so `load_split` reads their output exactly as
it reads the lra_release archive: `generate_listops(out)` writes
`out/listops-1000/basic_{train,val,test}.tsv` and `generate_pathfinder(out, 32)` writes
`out/pathfinder32/curv_contour_length_14/{imgs,metadata}/`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from lrulm.data.lra import listops as listops_lib

# ---------------------------------------------------------------------------- ListOps
# The rules of the LRA generator (lra_benchmarks/data/listops.py).
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # A node is an operator with this probability while depth < max_depth.
MAX_DEPTH = 10
MAX_ARGS = 10
MIN_LENGTH, MAX_LENGTH = 500, 2000  # Kept: min_length < tokens < max_length.

Tree = int | tuple[str, list["Tree"]]


class _TooLong(Exception):
    """A tree grew past max_length: it would be rejected, so stop building it."""


def _grow(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int]):
    # budget[0] counts down the tokens still allowed; a tree that uses them all would
    # fail `length < max_length`, so abandoning it early changes no accepted sample.
    if depth < max_depth and rng.random() <= VALUE_P:
        budget[0] -= 2  # The operator and its closing "]".
        if budget[0] <= 0:
            raise _TooLong
        args = [_grow(rng, depth + 1, max_depth, max_args, budget)]
        for _ in range(rng.randint(2, max_args) - 1):
            args.append(_grow(rng, depth + 1, max_depth, max_args, budget))
        return (rng.choice(OPERATORS), args)
    budget[0] -= 1
    if budget[0] <= 0:
        raise _TooLong
    return rng.randrange(10)


def listops_value(tree: Tree) -> int:
    """The value 0-9 of an expression tree: MIN, MAX, MED (floored median), SM (sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = sorted(listops_value(a) for a in args)
    match op:
        case "[MIN":
            return vals[0]
        case "[MAX":
            return vals[-1]
        case "[MED":
            mid = len(vals) // 2
            return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) // 2
        case "[SM":
            return sum(vals) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def listops_length(tree: Tree) -> int:
    """Token count of an expression, parentheses not counted."""
    return 1 if isinstance(tree, int) else 2 + sum(listops_length(a) for a in tree[1])


def listops_string(tree: Tree) -> str:
    """The released text form: each application in its own parentheses.

    MAX(2, 9) is `( ( ( [MAX 2 ) 9 ) ] )`: the LRA generator folds the arguments into
    nested pairs ((((op, a1), a2), ...), "]") and prints every pair in parentheses.
    """
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    parts = ["( " * len(args) + "( " + op]
    for arg in args:
        parts += [listops_string(arg), ")"]
    parts += [END, ")"]
    return " ".join(parts)


def sample_listops(
    rng: random.Random,
    *,
    min_length: int = MIN_LENGTH,
    max_length: int = MAX_LENGTH,
    max_depth: int = MAX_DEPTH,
    max_args: int = MAX_ARGS,
) -> Tree | None:
    """One draw of the LRA generator: a tree if its length is in the window, else None."""
    try:
        tree = _grow(rng, 1, max_depth, max_args, [max_length])
    except _TooLong:
        return None
    return tree if listops_length(tree) > min_length else None


def make_listops(
    num: int,
    *,
    min_length: int = MIN_LENGTH,
    max_length: int = MAX_LENGTH,
    max_depth: int = MAX_DEPTH,
    max_args: int = MAX_ARGS,
    seed: int = 0,
    max_attempts: int | None = None,
) -> list[tuple[str, int]]:
    """`num` distinct ListOps examples (released text form, value), by rejection sampling.

    Args:
      num: how many distinct expressions.
      min_length, max_length: keep expressions with min_length < tokens < max_length.
      max_depth, max_args: the generator's limits (LRA: 10 and 10).
      seed: the random seed; the same seed gives the same examples in the same order.
      max_attempts: give up after this many draws; default 10,000 per example + 100,000.

    Returns:
      A list of (source, target) pairs in generation order.

    Raises:
      ValueError: if `num` distinct expressions were not found within max_attempts.
    """
    if not 0 <= min_length < max_length - 1:
        raise ValueError(f"need 0 <= min_length < max_length - 1, got {min_length}, {max_length}")
    if max_args < 2 or max_depth < 1:
        raise ValueError(
            f"need max_args >= 2 (an operator takes 2 to max_args arguments) and max_depth >= 1; "
            f"got {max_args}, {max_depth}"
        )
    rng = random.Random(seed)
    attempts = max_attempts if max_attempts is not None else 10_000 * num + 100_000
    examples: dict[str, int] = {}  # Insertion-ordered: deterministic output order.
    for _ in range(attempts):
        if len(examples) >= num:
            break
        tree = sample_listops(
            rng,
            min_length=min_length,
            max_length=max_length,
            max_depth=max_depth,
            max_args=max_args,
        )
        if tree is not None:
            examples.setdefault(listops_string(tree), listops_value(tree))
    if len(examples) < num:
        raise ValueError(
            f"found only {len(examples)} of {num} distinct ListOps expressions with "
            f"{min_length} < tokens < {max_length} in {attempts} draws; widen the window, "
            "or ask for fewer (--num_train/--num_val/--num_test; in Python, max_attempts)"
        )
    return list(examples.items())


def generate_listops(
    out_dir: str,
    *,
    num_train: int = 96_000,
    num_val: int = 2_000,
    num_test: int = 2_000,
    seed: int = 0,
    **kwargs,
) -> dict[str, list[tuple[str, int]]]:
    """Writes `out_dir/listops-1000/basic_{train,val,test}.tsv` in the released format.

    Args:
      out_dir: the data_dir to write into.
      num_train, num_val, num_test: examples per split (LRA: 96k/2k/2k); no expression
        appears twice, within or across splits.
      seed: the random seed.
      **kwargs: `make_listops` options (min_length, max_length, max_depth, max_args, ...).

    Returns:
      {split: [(source, target), ...]} as written.
    """
    examples = make_listops(num_train + num_val + num_test, seed=seed, **kwargs)
    folder = os.path.join(out_dir, "listops-1000")
    os.makedirs(folder, exist_ok=True)
    splits = {
        "train": examples[:num_train],
        "val": examples[num_train : num_train + num_val],
        "test": examples[num_train + num_val :],
    }
    for split, rows in splits.items():
        with open(os.path.join(folder, listops_lib.FILES[split]), "w") as f:
            f.write("Source\tTarget\n")
            f.writelines(f"{source}\t{target}\n" for source, target in rows)
    return splits


# ------------------------------------------------------------------------- Pathfinder
@dataclasses.dataclass(frozen=True)
class PathfinderDifficulty:
    """One Pathfinder setting. Lengths are in pixels of a 32x32 image, scaled with it.

    Attributes:
      folder: the dataset folder name in the release.
      contour_length: dashes in each of the two marked paths.
      num_distractors: extra unmarked paths.
      distractor_length: dashes in each distractor.
    """

    folder: str
    contour_length: int
    num_distractors: int
    distractor_length: int


DIFFICULTIES = {
    "easy": PathfinderDifficulty("curv_baseline", 6, 1, 3),
    "intermediate": PathfinderDifficulty("curv_contour_length_9", 9, 2, 3),
    "hard": PathfinderDifficulty("curv_contour_length_14", 14, 2, 4),
}
_STEP = 2.0  # Dash period (32x32 pixels): a dash, then a gap of about one pixel.
_DASH = 0.55  # Fraction of each period drawn.
_WIDTH = 1.0  # Stroke width.
_RADIUS = 1.4  # Endpoint disc radius.
_GUARD = 5.0  # Width of the keep-out band drawn along each placed path.
_MAX_TURN = 0.6  # Largest change of direction between dashes, radians.
_SUPERSAMPLE = 4  # Drawn at 4x and box-filtered down, for anti-aliased gray strokes.
_CANDIDATES = 12  # Directions tried for each next dash before the walk restarts.


def _walk(rng: np.random.Generator, n: int, scale: float, res: int, keepout: np.ndarray):
    """A smooth random path of n dashes avoiding `keepout` and itself; None if stuck."""
    step, margin = _STEP * scale, 2.0 * scale

    def clear(p: np.ndarray) -> np.ndarray:  # p (..., 2): inside the margin, off keepout.
        inside = ((p >= margin) & (p < res - margin)).all(-1)
        ij = np.clip(p, 0, res - 1).astype(int)
        return inside & ~keepout[ij[..., 1], ij[..., 0]]

    for _ in range(10):
        pts = np.empty((n + 1, 2))
        pts[0] = rng.uniform(margin, res - margin, 2)
        if not clear(pts[0]):
            continue
        theta = rng.uniform(0, 2 * math.pi)
        for i in range(1, n + 1):
            # Candidate directions at once; take the first that keeps the path clear of
            # the other paths (at the dash's end and middle) and of itself.
            turns = theta + rng.uniform(-_MAX_TURN, _MAX_TURN, _CANDIDATES)
            q = pts[i - 1] + step * np.stack([np.cos(turns), np.sin(turns)], -1)
            ok = clear(q) & clear((q + pts[i - 1]) / 2)
            if i > 2:
                gaps = np.linalg.norm(q[:, None] - pts[None, : i - 2], axis=-1)
                ok &= gaps.min(-1) >= 1.5 * step
            if not ok.any():
                break
            j = int(ok.argmax())
            theta, pts[i] = turns[j], q[j]
        else:
            return pts
    return None


def _dashes(draw: ImageDraw.ImageDraw, pts: np.ndarray, width: float, k: float):
    for a, b in zip(pts[:-1], pts[1:]):
        end = a + _DASH * (b - a)
        draw.line([tuple(a * k), tuple(end * k)], fill=255, width=max(1, round(width * k)))


def _disc(draw: ImageDraw.ImageDraw, p: np.ndarray, radius: float):
    draw.ellipse([p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius], fill=255)


def render_pathfinder(
    rng: np.random.Generator, resolution: int, label: int, difficulty: PathfinderDifficulty
) -> np.ndarray:
    """One Pathfinder image, uint8 (resolution, resolution), black background.

    Two long dashed paths and some short distractors, none touching. Label 1: both
    endpoint discs sit on the ends of the same path. Label 0: one disc on each long
    path. Both classes draw the same strokes, so only connectivity tells them apart.
    """
    scale = resolution / 32
    for _ in range(100):
        keepout = Image.new("L", (resolution, resolution))
        guard = ImageDraw.Draw(keepout)
        paths = []
        lengths = [difficulty.contour_length] * 2
        lengths += [difficulty.distractor_length] * difficulty.num_distractors
        for n in lengths:
            pts = _walk(rng, n, scale, resolution, np.asarray(keepout) > 0)
            if pts is None:
                break
            paths.append(pts)
            # Later paths keep out of a band around this one and discs around its ends,
            # so no two paths touch and an end disc never lands on another path.
            for a, b in zip(pts[:-1], pts[1:]):
                guard.line([tuple(a), tuple(b)], fill=255, width=max(1, round(_GUARD * scale)))
            for p in (pts[0], pts[-1]):
                _disc(guard, p, 2.5 * _RADIUS * scale)
        else:
            break
    else:
        raise RuntimeError(f"could not place {len(lengths)} paths in a {resolution}² image")
    k = _SUPERSAMPLE
    canvas = Image.new("L", (resolution * k, resolution * k))
    draw = ImageDraw.Draw(canvas)
    for pts in paths:
        _dashes(draw, pts, _WIDTH * scale, k)
    a, b = paths[0], paths[1]
    ends = (a[0], a[-1]) if label else (a[rng.integers(2) * -1], b[rng.integers(2) * -1])
    for p in ends:
        _disc(draw, p * k, _RADIUS * scale * k)
    return np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX))


def generate_pathfinder(
    out_dir: str,
    resolution: int = 32,
    *,
    num: int = 1000,
    difficulty: str = "hard",
    seed: int = 0,
    per_folder: int = 1000,
) -> list[tuple[str, int]]:
    """Writes a Pathfinder dataset in the released layout.

    `out_dir/pathfinder{res}/{folder}/imgs/<k>/sample_<i>.png` and `metadata/<k>.npy`
    (plain text despite the suffix, as released): one line per image, fields
    `imgs/<k> sample_<i>.png <i> <label> <contour_length> <num_distractors>
    <distractor_length> <resolution>`.

    Args:
      out_dir: the data_dir to write into.
      resolution: image side: 32 (Pathfinder) or 128 (Path-X); any size >= 16 works.
      num: number of images; labels are balanced (num // 2 positives).
      difficulty: "easy", "intermediate" or "hard" (or a folder name such as
        "curv_contour_length_14"); see `DIFFICULTIES`.
      seed: the random seed; image i is drawn with the generator seeded by (seed, i).
      per_folder: images per `imgs/<k>` folder.

    Returns:
      [(path relative to the difficulty folder, label), ...] in metadata order.
    """
    by_folder = {d.folder: d for d in DIFFICULTIES.values()}
    if (spec := DIFFICULTIES.get(difficulty, by_folder.get(difficulty))) is None:
        names = ", ".join([*DIFFICULTIES, *by_folder])
        raise ValueError(f"unknown difficulty {difficulty!r}; use one of {names}")
    if resolution < 16:
        raise ValueError(f"resolution {resolution} is too small for two paths; use >= 16")
    root = os.path.join(out_dir, f"pathfinder{resolution}", spec.folder)
    os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
    labels = np.random.default_rng(seed).permutation(np.arange(num) % 2)
    written = []
    for k in range(math.ceil(num / per_folder)):
        os.makedirs(os.path.join(root, "imgs", str(k)), exist_ok=True)
        lines = []
        for i in range(min(per_folder, num - k * per_folder)):
            index = k * per_folder + i
            label = int(labels[index])
            rng = np.random.default_rng([seed, index])
            pixels = render_pathfinder(rng, resolution, label, spec)
            Image.fromarray(pixels, "L").save(os.path.join(root, "imgs", str(k), f"sample_{i}.png"))
            lines.append(
                f"imgs/{k} sample_{i}.png {i} {label} {spec.contour_length} "
                f"{spec.num_distractors} {spec.distractor_length} {resolution}\n"
            )
            written.append((f"imgs/{k}/sample_{i}.png", label))
        with open(os.path.join(root, "metadata", f"{k}.npy"), "w") as f:
            f.writelines(lines)
    return written
