"""The LRA generators (lrulm.data.lra.generate) and tools/make_lra_data.py: what they
write loads, follows the LRA rules, and is seeded; bad counts are usage errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import test_lra_data as loaders
from PIL import Image

from lrulm.data import lra
from lrulm.data.lra import generate
from lrulm.data.lra import synthetic as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_listops_generator_follows_the_lra_rules(tmp_path):
    assert generate.listops_string(("[MAX", [2, 9])) == "( ( ( [MAX 2 ) 9 ) ] )"
    written = generate.generate_listops(
        str(tmp_path), num_train=60, num_val=10, num_test=10, min_length=10, max_length=100
    )
    sources = [s for rows in written.values() for s, _ in rows]
    assert len(set(sources)) == 80  # Deduplicated, within and across splits.
    for split, rows in written.items():
        src = lra.load_split("listops", str(tmp_path), split)
        assert len(src) == len(rows)
        for i, (source, target) in enumerate(rows):
            tokens = loaders._decode(src[i])
            assert 10 < len(tokens) < 100
            assert loaders._evaluate(tokens) == target == int(src[i]["label"])
            assert [t for t in source.split() if t not in "()"] == tokens
            # One pair of parentheses per argument and per "]", none around the root.
            n_digits, n_ops = sum(t.isdigit() for t in tokens), tokens.count("]")
            assert source.count("(") == source.count(")") == n_digits + 2 * n_ops - 1
    again = generate.make_listops(80, min_length=10, max_length=100, seed=0)
    assert [s for s, _ in again] == sources  # Seeded.
    assert generate.make_listops(80, min_length=10, max_length=100, seed=1) != again
    labels = [t for rows in written.values() for _, t in rows]
    assert len(set(labels)) >= 6  # Not one degenerate value.


def test_listops_generator_gives_up_clearly():
    with pytest.raises(ValueError, match="found only 0 of 5 distinct ListOps expressions"):
        generate.make_listops(5, min_length=2, max_length=4, max_attempts=2000)


def test_pathfinder_generator_output_loads_balanced(tmp_path):
    written = generate.generate_pathfinder(str(tmp_path), 32, num=60, seed=0, per_folder=25)
    assert sum(label for _, label in written) == 30
    root = tmp_path / "pathfinder32" / "curv_contour_length_14"
    fields = (root / "metadata" / "2.npy").read_text().splitlines()[0].split()
    assert fields[:4] == ["imgs/2", "sample_0.png", "0", str(written[50][1])]
    labels, pixels = [], []
    for split in fx.SPLITS:
        src = lra.load_split("pathfinder", str(tmp_path), split)
        for i in range(len(src)):
            labels.append(int(src[i]["label"]))
            pixels.append(src[i]["inputs"])
    assert len(labels) == 60 and labels.count(1) == 30
    x = np.stack(pixels)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert (x == -1.0).mean() > 0.5 and x.max() == 1.0  # Dark background, white strokes.
    again = generate.render_pathfinder(
        np.random.default_rng([0, 7]), 32, written[7][1], generate.DIFFICULTIES["hard"]
    )
    np.testing.assert_array_equal(again, np.asarray(Image.open(root / "imgs/0/sample_7.png")))
    pathx = generate.generate_pathfinder(str(tmp_path), 128, num=4, difficulty="easy")
    assert [label for _, label in pathx].count(1) == 2
    assert os.path.isdir(tmp_path / "pathfinder128" / "curv_baseline" / "imgs" / "0")
    with pytest.raises(ValueError, match="unknown difficulty 'extreme'; use one of easy"):
        generate.generate_pathfinder(str(tmp_path), 32, num=2, difficulty="extreme")


def test_cli_writes_loadable_data(tmp_path):
    tool = os.path.join(REPO, "tools", "make_lra_data.py")
    args = ["--out", str(tmp_path), "--seed", "3"]
    sizes = ["--num_train", "5", "--num_val", "2", "--num_test", "2"]
    window = ["--min_length", "10", "--max_length", "60"]
    subprocess.run(
        [sys.executable, tool, "listops", *args, *sizes, *window], check=True, capture_output=True
    )
    subprocess.run(
        [sys.executable, tool, "pathfinder", *args, "--resolution", "32", "--num", "10"],
        check=True,
        capture_output=True,
    )
    assert len(lra.load_split("listops", str(tmp_path), "train")) == 5
    assert len(lra.load_split("pathfinder", str(tmp_path), "train")) == 8
    # Written again into the same folder: refused (it may hold the real release), or with
    # --force replaced whole (no stale file read beside the new ones).
    again = ["pathfinder", *args, "--resolution", "32", "--num", "5"]
    out = subprocess.run([sys.executable, tool, *again], capture_output=True, text=True)
    assert out.returncode == 2 and "holds files already" in out.stderr, out.stderr
    subprocess.run([sys.executable, tool, *again, "--force"], check=True, capture_output=True)
    assert len(lra.load_split("pathfinder", str(tmp_path), "train")) == 4
    assert len(lra.load_split("listops", str(tmp_path), "train")) == 5  # not touched
    # Counts out of range are usage errors: exit 2 and one line, no traceback; with --force
    # too, and the folder is kept as it was.
    args = [*args, "--force"]
    for bad, message in (
        (["listops", *args, "--num_train", "-3"], "--num_train must be at least 1; got -3"),
        (["pathfinder", *args, "--per_folder", "0"], "--per_folder must be at least 1; got 0"),
        (["listops", *args, "--min_length", "60", "--max_length", "10"], "need 0 <= min_length"),
    ):
        out = subprocess.run([sys.executable, tool, *bad], capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert len(lra.load_split("listops", str(tmp_path), "train")) == 5
    assert len(lra.load_split("pathfinder", str(tmp_path), "train")) == 4
