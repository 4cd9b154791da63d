"""LRA loaders on files in the released layouts, and bad-input messages. The generators
(lrulm.data.lra.generate, tools/make_lra_data.py): test_lra_generate.py."""

from __future__ import annotations

import copy
import logging
import os
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from lrulm import lra_task
from lrulm.data import lra
from lrulm.data.lra import image, listops
from lrulm.data.lra import synthetic as fx

INV_LISTOPS = {i: tok for tok, i in listops.VOCAB.items()}


def _evaluate(tokens: list[str]) -> int:
    """Independent ListOps evaluator over parenthesis-free prefix tokens (a stack machine)."""
    stack: list[list] = [[]]
    for tok in tokens:
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            value = {
                "[MIN": min,
                "[MAX": max,
                "[MED": lambda a: int(np.median(a)),  # The LRA generator's own definition.
                "[SM": lambda a: sum(a) % 10,
            }[op](args)
            stack[-1].append(value)
        else:
            stack[-1].append(int(tok))
    (value,) = stack[0]
    return value


def _decode(record: dict) -> list[str]:
    ids = record["inputs"][record["mask"]]
    return [INV_LISTOPS[int(i)] for i in ids]


def _bytes(inputs: np.ndarray, mask: np.ndarray) -> bytes:
    return bytes((inputs[mask] - 1).astype(np.uint8).tolist())


# ------------------------------------------------------------------------- registry
def test_task_registry_matches_the_paper():
    assert {n: t.seq_len for n, t in lra.TASKS.items()} == {
        "listops": 2000,
        "text": 4096,
        "retrieval": 4000,
        "image": 1024,
        "pathfinder": 1024,
        "pathx": 16384,
    }
    assert {n: t.num_classes for n, t in lra.TASKS.items()} == {
        "listops": 10,
        "text": 2,
        "retrieval": 2,
        "image": 10,
        "pathfinder": 2,
        "pathx": 2,
    }
    assert lra.TASKS["listops"].vocab_size == 16  # pad + 10 digits + 4 operators + "]".
    assert lra.TASKS["text"].vocab_size == lra.TASKS["retrieval"].vocab_size == 257
    for name in ("image", "pathfinder", "pathx"):
        assert (lra.TASKS[name].vocab_size, lra.TASKS[name].input_channels) == (None, 1)
    assert [n for n, t in lra.TASKS.items() if t.dual] == ["retrieval"]
    assert all(t.splits == ("train", "val", "test") for t in lra.TASKS.values())
    with pytest.raises(AttributeError):
        lra.TASKS["text"].seq_len = 1  # Frozen.


@pytest.mark.parametrize(
    "args, match",
    [
        (("cifar", "train"), "unknown LRA task 'cifar'; use one of listops, text, retrieval"),
        (("listops", "valid"), "unknown split 'valid'; use one of train, val, test"),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        lra.load_split(args[0], str(tmp_path), args[1])


def test_bad_on_error_and_seq_len_are_rejected(tmp_path):
    fx.write_listops(str(tmp_path))
    with pytest.raises(ValueError, match="data.on_error='ignore'; use one of"):
        lra.load_split("listops", str(tmp_path), "train", on_error="ignore")
    with pytest.raises(ValueError, match="seq_len=0; use a positive integer"):
        lra.load_split("listops", str(tmp_path), "train", seq_len=0)


# -------------------------------------------------------------------------- ListOps
def test_listops_records_are_the_expressions_without_parentheses(tmp_path):
    rows = {
        "train": [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("7", 7), ("( ( [SM 8 ) ] )", 8)],
        "val": [("( ( ( ( [MED 1 ) 2 ) 9 ) ] )", 2)],
        "test": [("( ( ( [MIN 4 ) ( ( ( [SM 5 ) 6 ) ] ) ) ] )", 1)],
    }
    fx.write_listops(str(tmp_path), rows)
    src = lra.load_split("listops", str(tmp_path), "train", seq_len=8)
    assert len(src) == 3 and src.num_skipped == 0
    r = src[0]
    assert r["inputs"].dtype == np.int32 and r["inputs"].shape == (8,)
    v = listops.VOCAB
    np.testing.assert_array_equal(r["inputs"], [v["[MAX"], v["2"], v["9"], v["]"], 0, 0, 0, 0])
    np.testing.assert_array_equal(r["mask"], [1, 1, 1, 1, 0, 0, 0, 0])
    assert r["mask"].dtype == bool and r["label"].dtype == np.int32 and r["label"].shape == ()
    assert int(r["label"]) == 9
    np.testing.assert_array_equal(src[1]["inputs"][:2], [v["7"], 0])
    test = lra.load_split("listops", str(tmp_path), "test")
    assert test[0]["inputs"].shape == (2000,)
    assert _decode(test[0]) == ["[MIN", "4", "[SM", "5", "6", "]", "]"]
    assert _evaluate(_decode(test[0])) == int(test[0]["label"]) == 1


def test_listops_labels_match_an_independent_evaluation(tmp_path):
    written = fx.write_listops(str(tmp_path), num=30, seed=3)
    for split in fx.SPLITS:
        src = lra.load_split("listops", str(tmp_path), split)
        assert len(src) == 30
        for i, (text, target) in enumerate(written[split]):
            tokens = _decode(src[i])
            assert tokens == [t for t in text.split() if t not in "()"]
            assert not src[i]["inputs"][len(tokens) :].any()  # Zero padding after.
            assert int(src[i]["label"]) == target == _evaluate(tokens)


def test_listops_truncation_and_archive_layout(tmp_path, caplog):
    long_expr = "( " * 20 + "( [SM" + " 1 )" * 20 + " ] )"
    fx.write_listops(str(tmp_path / "lra_release"), {"train": [(long_expr, 0)]})
    with caplog.at_level(logging.WARNING):
        src = lra.load_split("listops", str(tmp_path), "train", seq_len=10)
    assert "longer than seq_len=10" in caplog.text
    assert src[0]["mask"].all() and len(_decode(src[0])) == 10
    assert src.path.endswith(os.path.join("lra_release", "listops-1000", "basic_train.tsv"))


def test_two_copies_in_data_dir_say_which_is_read(tmp_path, caplog):
    """Generated files beside the release's: the preferred copy is read and the warning
    names both (once)."""
    fx.write_listops(str(tmp_path), num=4)
    fx.write_listops(str(tmp_path / "lra_release"), num=6)
    with caplog.at_level(logging.WARNING):
        src = lra.load_split("listops", str(tmp_path), "val", seq_len=None)
        lra.load_split("listops", str(tmp_path), "val", seq_len=None)
    first = os.path.join(str(tmp_path), "listops-1000", "basic_val.tsv")
    assert src.path == first
    other = os.path.join(str(tmp_path), "lra_release", "listops-1000", "basic_val.tsv")
    assert caplog.text.count(f"reading {first}; data_dir also holds {other} (ignored)") == 1
    # The archive's own two copies (nested and top-level pathfinder32): read as it unpacks.
    caplog.clear()
    fx.write_pathfinder(str(tmp_path / "pf"), 32, num=10, nested=True)
    fx.write_pathfinder(str(tmp_path / "pf" / "lra_release"), 32, num=10)
    with caplog.at_level(logging.WARNING):
        src = lra.load_split("pathfinder", str(tmp_path / "pf"), "val", seq_len=None)
    assert (
        os.path.join("lra_release", "lra_release") in src.path and "also holds" not in caplog.text
    )


def test_one_data_dir_for_every_task_of_the_unpacked_archive(tmp_path):
    """The archive unpacks to lra_release/lra_release/{listops-1000, tsv_data,
    pathfinder32, pathfinder128}: data_dir = the folder holding lra_release/ serves all."""
    nested = str(tmp_path / "lra_release" / "lra_release")
    fx.write_listops(nested, num=4)
    fx.write_aan(nested, num=4)
    fx.write_pathfinder(str(tmp_path), 32, num=10, nested=True)
    for task in ("listops", "retrieval", "pathfinder"):
        src = lra.load_split(task, str(tmp_path), "train", seq_len=None)
        assert os.path.join("lra_release", "lra_release") in src.path, task
        assert len(src) > 0


@pytest.mark.parametrize(
    "line, why",
    [
        ("( ( [SM 1 ) ] )", "1 tab-separated columns, expected 2"),
        ("( ( [SM 1 ) ] )\t3\textra", "3 tab-separated columns, expected 2"),
        ("( ( [SM 1 ) ] )\tone", "label 'one' is not an int"),
        ("( ( [SM 1 ) ] )\t10", "label 10 is outside 0-9"),
        ("( ( [SUM 1 ) ] )\t1", "unknown token '[SUM'"),
        ("( ( [SM 12 ) ] )\t2", "unknown token '12'"),
        ("\t2", "empty expression"),
    ],
)
def test_listops_bad_rows_name_file_and_line(tmp_path, caplog, line, why):
    path = tmp_path / "listops-1000" / "basic_train.tsv"
    path.parent.mkdir()
    path.write_text(
        f"Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n{line}\n( ( ( [MIN 2 ) 9 ) ] )\t2\n"
    )
    with pytest.raises(ValueError) as e:
        lra.load_split("listops", str(tmp_path), "train")
    assert f"{path}, line 3: {why}" in str(e.value)  # Line 1 is the header.
    assert "--config.data.on_error=skip" in str(e.value)
    with caplog.at_level(logging.WARNING):
        src = lra.load_split("listops", str(tmp_path), "train", on_error="skip")
    assert src.num_skipped == 1 and len(src) == 2
    assert [int(src[i]["label"]) for i in range(2)] == [9, 2]
    assert "skipped 1 bad record" in caplog.text and "line 3" in caplog.text


def test_listops_header_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "listops-1000" / "basic_train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbfSource\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n")
    src = lra.load_split("listops", str(tmp_path), "train")
    assert len(src) == 1 and int(src[0]["label"]) == 9


def test_listops_missing_file_names_the_expected_layout(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        lra.load_split("listops", str(tmp_path / "nowhere"), "val")
    msg = str(e.value)
    assert os.path.join(str(tmp_path / "nowhere"), "listops-1000", "basic_val.tsv") in msg
    assert "lra_release" in msg and "does not exist" in msg
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(FileNotFoundError, match="is a file; give the folder holding"):
        lra.load_split("listops", str(afile), "val")
    # ~ is the home folder, as a shell would read it.
    fx.write_listops(str(tmp_path / "home" / "lra"), num=3)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert len(lra.load_split("listops", "~/lra", "val")) == 3


# ----------------------------------------------------------------------------- Text
def test_text_records_are_review_bytes_plus_one(tmp_path):
    written = fx.write_imdb(str(tmp_path), num_per_class=3)
    train = lra.load_split("text", str(tmp_path), "train")
    assert len(train) == 6 and sorted(train.files) == [path for path, _, _ in written["train"]]
    by_path = {path: i for i, path in enumerate(train.files)}
    for path, text, label in written["train"]:
        r = train[by_path[path]]
        assert r["inputs"].shape == r["mask"].shape == (4096,) and r["inputs"].dtype == np.int32
        data = text.encode("utf-8")[:4096]
        assert _bytes(r["inputs"], r["mask"]) == data and int(r["label"]) == label
        assert r["mask"].sum() == len(data) and not r["inputs"][len(data) :].any()
        assert r["inputs"][r["mask"]].min() >= 1
    # The 5,000-byte review is cut at 4096 bytes, mid-way through the two bytes of "é".
    long_one = train[by_path[written["train"][3][0]]]
    assert long_one["mask"].all() and long_one["inputs"][-1] == 0xC3 + 1
    # IMDB has no validation split: val and test are both aclImdb/test.
    val, test = (lra.load_split("text", str(tmp_path), s, seq_len=64) for s in ("val", "test"))
    assert len(val) == len(test) == 6
    texts = {path: text for path, text, _ in written["test"]}
    for i in range(6):
        np.testing.assert_array_equal(val[i]["inputs"], test[i]["inputs"])
        assert _bytes(test[i]["inputs"], test[i]["mask"]) == texts[test.files[i]].encode()[:64]


def test_text_records_mix_the_classes_in_a_fixed_order(tmp_path):
    """Reviews come neg/ then pos/ on disk; the records are one fixed permutation, so the
    first batches of a split (an evaluation with train.eval_steps > 0) hold both classes."""
    fx.write_imdb(str(tmp_path), num_per_class=20, long_review=False)
    test = lra.load_split("text", str(tmp_path), "test", seq_len=16)
    labels = [int(test[i]["label"]) for i in range(len(test))]
    assert sorted(labels) == [0] * 20 + [1] * 20
    assert 0 in labels[:8] and 1 in labels[:8]
    again = lra.load_split("text", str(tmp_path), "test", seq_len=16)
    assert again.files == test.files  # the same order every time


def test_text_missing_and_empty_reviews(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"aclImdb.train.*aclImdb_v1.tar.gz"):
        lra.load_split("text", str(tmp_path), "train")
    fx.write_imdb(str(tmp_path), num_per_class=2)
    os.rename(tmp_path / "aclImdb" / "test" / "pos", tmp_path / "aclImdb" / "test" / "positive")
    with pytest.raises(FileNotFoundError, match=r"test.pos of \*.txt reviews"):
        lra.load_split("text", str(tmp_path), "test")
    empty = tmp_path / "aclImdb" / "train" / "neg" / "9_1.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{empty}: empty review"):
        lra.load_split("text", str(tmp_path), "train")
    src = lra.load_split("text", str(tmp_path / "aclImdb"), "train", on_error="skip")
    assert src.num_skipped == 1 and len(src) == 4
    empty.unlink()
    (tmp_path / "aclImdb" / "train" / "pos" / "folder.txt").mkdir()
    with pytest.raises(ValueError, match="folder.txt: not a file"):
        lra.load_split("text", str(tmp_path), "train", on_error="raise")
    src = lra.load_split("text", str(tmp_path / "aclImdb"), "train", on_error="skip")
    assert src.num_skipped == 1 and len(src) == 4


# ------------------------------------------------------------------------ Retrieval
def test_retrieval_records_hold_both_documents(tmp_path):
    written = fx.write_aan(str(tmp_path), num=4)
    for split in fx.SPLITS:
        src = lra.load_split("retrieval", str(tmp_path), split)
        assert len(src) == 4
        for i, (label, _, _, text1, text2) in enumerate(written[split]):
            r = src[i]
            assert r["inputs"].shape == r["mask"].shape == (2, 4000)
            assert r["inputs"].dtype == np.int32 and r["mask"].dtype == bool
            assert _bytes(r["inputs"][0], r["mask"][0]) == text1.encode()[:4000]
            assert _bytes(r["inputs"][1], r["mask"][1]) == text2.encode()[:4000]
            assert int(r["label"]) == int(float(label))
    first = lra.load_split("retrieval", str(tmp_path), "train")[0]
    assert first["mask"][0].all() and first["mask"][1].sum() < 4000  # The 4,500-byte text.
    assert src.path.endswith("new_aan_pairs.test.tsv")
    val = lra.load_split("retrieval", str(tmp_path), "val", seq_len=16)
    assert val.path.endswith("new_aan_pairs.eval.tsv") and val[0]["inputs"].shape == (2, 16)


def test_crlf_line_endings_read_like_lf(tmp_path):
    fx.write_listops(str(tmp_path), num=4)
    fx.write_aan(str(tmp_path), num=4)
    # Read now: a retrieval source reads its lines back from the file in __getitem__.
    before = [list(lra.load_split(t, str(tmp_path), "test")) for t in ("listops", "retrieval")]
    for path in (tmp_path / "listops-1000").iterdir():
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    for path in (tmp_path / "tsv_data").iterdir():
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    after = [lra.load_split(t, str(tmp_path), "test") for t in ("listops", "retrieval")]
    for old, new in zip(before, after):
        assert len(old) == len(new) == 4
        for i in range(4):
            np.testing.assert_array_equal(old[i]["inputs"], new[i]["inputs"])
            assert old[i]["label"] == new[i]["label"]


@pytest.mark.parametrize(
    "row, why",
    [
        (("1", "a", "b", "only four"), "4 tab-separated columns, expected 5"),
        (("2", "a", "b", "x", "y"), "label '2' is not 0 or 1"),
        (("0.5", "a", "b", "x", "y"), "label '0.5' is not 0 or 1"),
        (("yes", "a", "b", "x", "y"), "label 'yes' is not 0 or 1"),
    ],
)
def test_retrieval_bad_rows_name_file_and_line(tmp_path, row, why):
    good = ("1", "a", "b", "x", "y")
    fx.write_aan(str(tmp_path), {"train": [good, good, row, good]})
    path = tmp_path / "tsv_data" / "new_aan_pairs.train.tsv"
    with pytest.raises(ValueError, match=f"{path}, line 3: {why}"):
        lra.load_split("retrieval", str(tmp_path), "train")
    src = lra.load_split("retrieval", str(tmp_path), "train", on_error="skip")
    assert (src.num_skipped, len(src)) == (1, 3)
    assert all(_bytes(src[i]["inputs"][1], src[i]["mask"][1]) == b"y" for i in range(3))


# ---------------------------------------------------------------------------- Image
def test_image_is_pil_grayscale_row_major_normalised(tmp_path):
    written = fx.write_cifar(str(tmp_path), num_per_batch=10, num_test=6)
    train, val, test = (lra.load_split("image", str(tmp_path), s) for s in fx.SPLITS)
    # The last tenth of the 50 training images is val (5,000 of 50,000 in the real set).
    assert (len(train), len(val), len(test)) == (45, 5, 6)
    data, labels = written["train"]
    cases = [(train, written["train"], 0), (val, written["train"], 45), (test, written["test"], 0)]
    for src, (d, lab), offset in cases:
        for i in (0, len(src) - 1):
            rgb = d[offset + i].reshape(3, 32, 32).transpose(1, 2, 0)  # Channel-major rows.
            gray = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), np.float32)
            r = src[i]
            assert r["inputs"].shape == (1024, 1) and r["inputs"].dtype == np.float32
            np.testing.assert_allclose(r["inputs"][:, 0], (gray.reshape(-1) - 122.6) / 61.0)
            assert r["inputs"][5 * 32 + 7, 0] == pytest.approx((gray[5, 7] - 122.6) / 61.0)
            assert r["mask"].shape == (1024,) and r["mask"].all()
            assert int(r["label"]) == lab[offset + i]
    assert [int(test[i]["label"]) for i in range(6)] == list(written["test"][1])
    assert [int(train[i]["label"]) for i in range(45)] == list(labels[:45])
    with pytest.raises(ValueError, match="seq_len=2048 for Image"):
        lra.load_split("image", str(tmp_path), "test", seq_len=2048)
    mean, std = image.gray_stats(str(tmp_path))
    gray_all = image.to_gray(data)
    assert mean == pytest.approx(gray_all.mean()) and std == pytest.approx(gray_all.std())


def test_image_bad_batches(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.test_batch"):
        lra.load_split("image", str(tmp_path), "test")
    fx.write_cifar(str(tmp_path), num_per_batch=4, num_test=4)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"labels"][2] = 11
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match=f"{path}, image 2: label 11 is outside 0-9"):
        lra.load_split("image", str(tmp_path), "test")
    assert len(lra.load_split("image", str(tmp_path), "test", on_error="skip")) == 3
    # A pickle that would run code is refused, not executed.
    with open(path, "wb") as f:
        pickle.dump({b"data": os.system}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch.*posix.system"):
        lra.load_split("image", str(tmp_path), "test")


# ----------------------------------------------------------------------- Pathfinder
def test_pathfinder_split_is_fixed_disjoint_and_80_10_10(tmp_path):
    written = fx.write_pathfinder(str(tmp_path), 32, num=50, per_folder=8)
    by_path = {p: (label, px) for p, label, px in written}
    splits = {s: lra.load_split("pathfinder", str(tmp_path), s) for s in fx.SPLITS}
    assert [len(splits[s]) for s in fx.SPLITS] == [40, 5, 5]
    seen = [p for s in fx.SPLITS for p in splits[s].images]
    assert sorted(seen) == sorted(by_path)  # Every image exactly once.
    # The split is pinned: changing it would move test images into training.
    assert splits["val"].images == [
        "imgs/2/sample_6.png",
        "imgs/4/sample_5.png",
        "imgs/0/sample_7.png",
        "imgs/2/sample_4.png",
        "imgs/2/sample_7.png",
    ]
    src = splits["train"]
    for i in (0, 17, 39):
        label, px = by_path[src.images[i]]
        r = src[i]
        assert r["inputs"].shape == (1024, 1) and r["inputs"].dtype == np.float32
        np.testing.assert_allclose(r["inputs"][:, 0], px.reshape(-1) / 127.5 - 1.0, atol=1e-6)
        assert r["mask"].shape == (1024,) and r["mask"].all() and int(r["label"]) == label
    with pytest.raises(ValueError, match="seq_len=1000 for pathfinder"):
        lra.load_split("pathfinder", str(tmp_path), "val", seq_len=1000)


def test_pathfinder_reads_binary_npy_metadata_too(tmp_path):
    written = fx.write_pathfinder(str(tmp_path), 32, num=10, per_folder=10)
    meta = tmp_path / "pathfinder32" / "curv_contour_length_14" / "metadata" / "0.npy"
    text = lra.load_split("pathfinder", str(tmp_path), "train")
    rows = np.array([line.split() for line in meta.read_text().splitlines()])
    np.save(meta, rows)  # A real .npy of strings, as np.save would write it.
    assert meta.read_bytes().startswith(b"\x93NUMPY")
    binary = lra.load_split("pathfinder", str(tmp_path), "train")
    assert binary.images == text.images and len(binary) == 8
    labels = {p: label for p, label, _ in written}
    assert [int(binary[i]["label"]) for i in range(8)] == [labels[p] for p in binary.images]
    for bad in (b"\x93NUMPYgarbage", None):  # a broken header; an array of objects
        if bad is None:
            np.save(meta, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        else:
            meta.write_bytes(bad)
        with pytest.raises(ValueError, match=r"0.npy: not a readable .npy array of strings"):
            lra.load_split("pathfinder", str(tmp_path), "train")


def test_pathx_prefers_the_nested_archive_copy(tmp_path):
    fx.write_pathfinder(str(tmp_path / "lra_release"), 128, num=10, seed=1)  # Top-level copy.
    written = fx.write_pathfinder(str(tmp_path), 128, num=10, nested=True)
    src = lra.load_split("pathx", str(tmp_path), "train")
    assert os.path.join("lra_release", "lra_release", "pathfinder128") in src.path
    assert len(src) == 8 and src[0]["inputs"].shape == (16384, 1)
    px = {p: x for p, _, x in written}[src.images[0]]
    np.testing.assert_allclose(src[0]["inputs"][:, 0], px.reshape(-1) / 127.5 - 1.0, atol=1e-6)
    # With only the (broken) top-level copy, its bad images say where the good one is.
    top = tmp_path / "top"
    fx.write_pathfinder(str(top / "lra_release"), 128, num=10)
    os.remove(
        top
        / "lra_release"
        / "pathfinder128"
        / "curv_contour_length_14"
        / "imgs"
        / "0"
        / "sample_2.png"
    )
    with pytest.raises(ValueError, match="top-level pathfinder128 copy, which is broken"):
        lra.load_split("pathx", str(top), "train")
    with pytest.raises(ValueError, match="top-level pathfinder128 copy"):  # data_dir one lower
        lra.load_split("pathx", str(top / "lra_release"), "train")
    # A bad image in the nested (good) copy is not blamed on the top-level one, whichever
    # of the two folders data_dir names.
    nested = tmp_path / "lra_release" / "lra_release" / "pathfinder128" / "curv_contour_length_14"
    os.remove(nested / "imgs" / "0" / "sample_2.png")
    for data_dir in (tmp_path, tmp_path / "lra_release"):
        with pytest.raises(ValueError, match="sample_2.png does not exist") as e:
            lra.load_split("pathx", str(data_dir), "train")
        assert "top-level" not in str(e.value)


def test_pathfinder_bad_inputs(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"pathfinder32.curv_contour_length_14"):
        lra.load_split("pathfinder", str(tmp_path), "train")
    fx.write_pathfinder(str(tmp_path), 32, num=20, per_folder=10)
    root = tmp_path / "pathfinder32" / "curv_contour_length_14"
    clean = {s: set(lra.load_split("pathfinder", str(tmp_path), s).images) for s in fx.SPLITS}
    meta = root / "metadata" / "1.npy"
    lines = meta.read_text().splitlines()
    lines[3] = lines[3].replace("sample_3.png 3 0", "sample_3.png 3 maybe")
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{meta}, line 4: label 'maybe' is not 0 or 1"):
        lra.load_split("pathfinder", str(tmp_path), "test")
    os.remove(root / "imgs" / "0" / "sample_5.png")
    with pytest.raises(
        ValueError, match=r"0.npy, line 6: the image .*imgs/0/sample_5.png does not exist\. Re-ext"
    ):
        lra.load_split("pathfinder", str(tmp_path), "test")
    # An empty PNG (the release has such files) is found when the split is listed, not
    # when training first draws it.
    fx.write_pathfinder(str(tmp_path / "e"), 32, num=20, per_folder=10)
    other = tmp_path / "e" / "pathfinder32" / "curv_contour_length_14"
    (other / "imgs" / "1" / "sample_7.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1.npy, line 8: the image .*sample_7.png is empty"):
        lra.load_split("pathfinder", str(tmp_path / "e"), "train")
    (root / "imgs" / "1" / "sample_7.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        sizes = [lra.load_split("pathfinder", str(tmp_path), s, on_error="skip") for s in fx.SPLITS]
    assert sum(len(s) for s in sizes) == 17 and sum(s.num_skipped for s in sizes) == 3
    # Skipping a bad line moves no other image into another split.
    assert all(set(src.images) <= clean[s] for s, src in zip(fx.SPLITS, sizes))
    # A PNG damaged after the listing is named when it is read; with on_error="skip" the
    # next record stands in for it, and the trainer weighs it 0.
    src = sizes[0]
    victim = root / src.images[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    strict = copy.copy(src)
    strict.on_error = "raise"
    with pytest.raises(ValueError, match=f"{victim}: unreadable image.*on_error=skip"):
        strict[0]
    with caplog.at_level(logging.WARNING):
        record, readable = src.read(0)
    assert not readable and "skipped an unreadable record" in caplog.text
    np.testing.assert_array_equal(record["inputs"], src[1]["inputs"])
    weighted = lra_task._Weighted(src)
    assert weighted[0]["weight"] == 0 and weighted[1]["weight"] == 1


# ----------------------------------------------------------------- Source contract
def test_every_source_is_a_picklable_grain_source(tmp_path):
    fx.write_all(str(tmp_path))
    shapes = {
        "listops": (32,),
        "text": (32,),
        "retrieval": (2, 32),
        "image": (1024, 1),
        "pathfinder": (1024, 1),
        "pathx": (16384, 1),
    }
    for task, shape in shapes.items():
        seq_len = 32 if lra.TASKS[task].vocab_size else None
        src = lra.load_split(task, str(tmp_path), "train", seq_len=seq_len)
        assert isinstance(src, grain.sources.RandomAccessDataSource)
        copy = pickle.loads(pickle.dumps(src))
        assert repr(copy) == repr(src) and len(copy) == len(src)
        for key in ("inputs", "mask", "label"):
            np.testing.assert_array_equal(copy[1][key], src[1][key])
        batch = next(iter(grain.MapDataset.source(src).batch(4)))
        assert batch["inputs"].shape == (4, *shape)
        assert batch["mask"].shape == (4, *shape[: 2 if task == "retrieval" else 1])
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        with pytest.raises(IndexError):
            src[len(src)]
        skipping = lra.load_split(task, str(tmp_path), "train", seq_len=seq_len, on_error="skip")
        assert skipping.on_error == "skip", task  # what a record that fails to read does
