"""What a third mutation audit found untested: the LRA readers' edges (bad labels,
blank lines, stray files, tiny splits, records past the end), the pieces of generate
and score that run before a model is loaded, the preemption watcher and timer, and the
run outputs' small figures (throughput, the progress bar, TensorBoard's purge step)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import types

import jax
import numpy as np
import pytest
from PIL import Image

from lrulm import generate as gen
from lrulm import metrics as metrics_lib
from lrulm import preemption
from lrulm import score as score_lib
from lrulm.data import lra
from lrulm.data.lra import image, listops, pathfinder, retrieval, text
from lrulm.data.lra import synthetic as fx


def _listops_file(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "listops-1000" / "basic_train.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("Source\tTarget\n" + "".join(f"{line}\n" for line in lines))
    return str(path)


def _rewrite_batch(path, **fields) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch.update({k.encode(): v for k, v in fields.items()})
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


# ------------------------------------------------------------- the source contract
def test_a_negative_index_is_out_of_range(tmp_path):
    fx.write_listops(str(tmp_path), num=3)
    src = lra.load_split("listops", str(tmp_path), "train")
    with pytest.raises(IndexError, match="index -1 out of range"):
        src[-1]
    with pytest.raises(IndexError):
        src.read(len(src))


def test_the_last_unreadable_record_is_stood_in_for_by_the_first(tmp_path):
    fx.write_pathfinder(str(tmp_path), 32, num=10, per_folder=10)
    src = lra.load_split("pathfinder", str(tmp_path), "train", on_error="skip")
    last = len(src) - 1
    (tmp_path / "pathfinder32" / "curv_contour_length_14" / src.images[last]).write_bytes(b"x")
    record, readable = src.read(last)
    assert not readable
    np.testing.assert_array_equal(record["inputs"], src[0]["inputs"])


def test_skipped_records_warn_naming_five_and_only_when_there_are_some(tmp_path, caplog):
    good = "( ( [SM 1 ) ] )\t1"
    path = _listops_file(tmp_path, [good] + [f"( ( [SM 1 ) ] )\t{10 + i}" for i in range(7)])
    with caplog.at_level(logging.WARNING):
        src = lra.load_split("listops", str(tmp_path), "train", on_error="skip")
    assert src.num_skipped == 7
    assert "skipped 7 bad record(s)" in caplog.text
    assert caplog.text.count(f"{path}, line ") == 5  # lines 3..7 named, 8 and 9 counted
    assert "line 7:" in caplog.text and "line 8:" not in caplog.text
    caplog.clear()
    _listops_file(tmp_path, [good])
    with caplog.at_level(logging.WARNING):
        lra.load_split("listops", str(tmp_path), "train", on_error="skip")
    assert "skipped" not in caplog.text


@pytest.mark.parametrize("module", [listops, text, retrieval, image, pathfinder])
def test_each_reader_refuses_an_unknown_split_itself(tmp_path, module):
    with pytest.raises(ValueError, match="unknown split 'valid'; use one of train, val, test"):
        module.load(str(tmp_path), "valid")


def test_seq_len_true_is_not_one(tmp_path):
    fx.write_listops(str(tmp_path), num=3)
    with pytest.raises(ValueError, match="seq_len=True; use a positive integer"):
        lra.load_split("listops", str(tmp_path), "train", seq_len=True)


def test_a_split_with_every_record_skipped_is_refused(tmp_path):
    fx.write_cifar(str(tmp_path), num_per_batch=2, num_test=3)
    _rewrite_batch(tmp_path / "cifar-10-batches-py" / "test_batch", labels=[10, 11, 12])
    with pytest.raises(ValueError, match=r"Image test .* has no records: too few images"):
        lra.load_split("image", str(tmp_path), "test", on_error="skip")


# -------------------------------------------------------------------------- ListOps
def test_listops_negative_label_blank_lines_and_stray_control_bytes(tmp_path):
    _listops_file(tmp_path, ["( ( [SM 1 ) ] )\t1", "( ( [SM 1 ) ] )\t-1"])
    with pytest.raises(ValueError, match="line 3: label -1 is outside 0-9"):
        lra.load_split("listops", str(tmp_path), "train")
    _listops_file(tmp_path, ["( ( [SM 1 ) ] )\t1", "   \t ", "( ( [MAX 2 ) ] )\t2"])
    src = lra.load_split("listops", str(tmp_path), "train")  # a blank line is no record
    assert (len(src), src.num_skipped) == (2, 0)
    # Bytes 1..4 stand for the operators inside tokenize: in the input they are no token.
    with pytest.raises(ValueError, match="unknown token"):
        listops.tokenize(b"\x01 2 ]")


def test_listops_warns_only_of_expressions_longer_than_seq_len(tmp_path, caplog):
    _listops_file(tmp_path, ["( ( ( [MAX 2 ) 9 ) ] )\t9"])  # 4 tokens
    with caplog.at_level(logging.WARNING):
        src = lra.load_split("listops", str(tmp_path), "train", seq_len=4)
    assert src[0]["mask"].all() and "truncated" not in caplog.text
    with caplog.at_level(logging.WARNING):
        lra.load_split("listops", str(tmp_path), "train", seq_len=3)
    assert "1 of 1 expressions are longer than seq_len=3" in caplog.text


def test_listops_with_every_line_skipped_says_so(tmp_path):
    _listops_file(tmp_path, ["( ( [SM 1 ) ] )\t10"])
    with pytest.raises(ValueError, match="basic_train.tsv: no ListOps records"):
        lra.load_split("listops", str(tmp_path), "train", on_error="skip")


# ----------------------------------------------------------------------------- Text
def test_text_order_is_pinned(tmp_path):
    """The record order is fixed forever (a resumed run's data order depends on it)."""
    fx.write_imdb(str(tmp_path), num_per_class=3, long_review=False)
    src = lra.load_split("text", str(tmp_path), "test", seq_len=8)
    order = ["pos/1_7.txt", "neg/0_1.txt", "pos/2_10.txt", "pos/0_9.txt", "neg/1_2.txt"]
    assert src.files == [*order, "neg/2_3.txt"]


def test_text_stray_files_and_an_empty_class_folder(tmp_path):
    fx.write_imdb(str(tmp_path), num_per_class=2, long_review=False)
    neg = tmp_path / "aclImdb" / "train" / "neg"
    (neg / "notes.md").write_text("not a review")
    src = lra.load_split("text", str(tmp_path), "train")
    assert len(src) == 4 and not any(f.endswith(".md") for f in src.files)
    for review in (tmp_path / "aclImdb" / "train" / "pos").iterdir():
        review.unlink()
    with pytest.raises(FileNotFoundError, match=r"pos holds no \*.txt reviews"):
        lra.load_split("text", str(tmp_path), "train")


# ------------------------------------------------------------------------ Retrieval
def test_retrieval_blank_lines_a_changed_file_and_no_records(tmp_path):
    good = "\t".join(("1", "a", "b", "x", "y")) + "\n"
    folder = tmp_path / "tsv_data"
    folder.mkdir()
    path = folder / "new_aan_pairs.train.tsv"
    path.write_text(good + "\n" + good)
    src = lra.load_split("retrieval", str(tmp_path), "train")
    assert (len(src), src.num_skipped) == (2, 0)
    path.write_text("1\ta\tb\tx y\n\n" + good)  # the first line lost a tab since
    with pytest.raises(ValueError, match="changed since the source was built"):
        src[0]
    path.write_text("2\ta\tb\tx\ty\n")
    with pytest.raises(ValueError, match="no Retrieval records"):
        lra.load_split("retrieval", str(tmp_path), "train", on_error="skip")


# ---------------------------------------------------------------------------- Image
def test_image_val_keeps_one_image_of_a_tiny_training_set(tmp_path):
    fx.write_cifar(str(tmp_path), num_per_batch=1, num_test=1)  # 5 training images
    train, val = (lra.load_split("image", str(tmp_path), s) for s in ("train", "val"))
    assert (len(train), len(val)) == (4, 1)


def test_image_batches_with_bad_labels_or_data(tmp_path):
    fx.write_cifar(str(tmp_path), num_per_batch=2, num_test=3)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _rewrite_batch(path, labels=[1, -1, 2])
    with pytest.raises(ValueError, match="image 1: label -1 is outside 0-9"):
        lra.load_split("image", str(tmp_path), "test")
    _rewrite_batch(path, labels=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="b'labels' is float64"):
        lra.load_split("image", str(tmp_path), "test")
    _rewrite_batch(path, labels=[1, 2, 3], data=np.zeros((3, 1024), np.uint8))
    with pytest.raises(ValueError, match=r"b'data' is uint8 \(3, 1024\), expected uint8"):
        lra.load_split("image", str(tmp_path), "test")


def test_image_reads_batches_pickled_by_numpy_before_2(tmp_path):
    """The released batches name numpy.core (numpy < 2), now numpy._core."""
    written = fx.write_cifar(str(tmp_path), num_per_batch=2, num_test=3)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    raw = path.read_bytes()
    assert b"numpy._core" in raw
    path.write_bytes(raw.replace(b"numpy._core", b"numpy.core"))
    src = lra.load_split("image", str(tmp_path), "test")
    assert [int(src[i]["label"]) for i in range(3)] == list(written["test"][1])


# ----------------------------------------------------------------------- Pathfinder
def _pathfinder_meta(tmp_path) -> tuple:
    fx.write_pathfinder(str(tmp_path), 32, num=10, per_folder=10)
    root = tmp_path / "pathfinder32" / "curv_contour_length_14"
    return root, root / "metadata" / "0.npy"


def test_pathfinder_metadata_edges(tmp_path):
    root, meta = _pathfinder_meta(tmp_path)
    lines = meta.read_text().splitlines()
    # A blank line is no record; nor is a file in metadata/ that is not <k>.npy.
    meta.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
    (root / "metadata" / "README").write_text("imgs/0 sample_0.png 0 1\nnot metadata\n")
    sizes = [len(lra.load_split("pathfinder", str(tmp_path), s)) for s in fx.SPLITS]
    assert sizes == [8, 1, 1]
    meta.write_text("\n".join(lines[:2] + ["imgs/0 sample_2.png 2"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match="0.npy, line 3: 3 fields, expected at least 4"):
        lra.load_split("pathfinder", str(tmp_path), "train")


def test_pathfinder_metadata_files_in_numeric_order(tmp_path):
    folder = tmp_path / "metadata"
    folder.mkdir()
    for name in ("10.npy", "2.npy", "x.npy", "0.npy", "1.npy"):
        (folder / name).write_text("")
    names = [os.path.basename(p) for p in pathfinder._metadata_files(str(tmp_path))]
    assert names == ["0.npy", "1.npy", "2.npy", "10.npy", "x.npy"]


def test_pathfinder_image_of_another_size_and_the_32_top_level_copy(tmp_path):
    root, _ = _pathfinder_meta(tmp_path)
    src = lra.load_split("pathfinder", str(tmp_path), "train")
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(root / src.images[0])
    with pytest.raises(ValueError, match="image is 16x16, expected 32x32 for pathfinder"):
        src[0]
    # The archive's top-level 32x32 copy is whole: a missing image is not blamed on it.
    top = tmp_path / "top"
    fx.write_pathfinder(str(top / "lra_release"), 32, num=10)
    os.remove(top / "lra_release" / "pathfinder32" / "curv_contour_length_14" / "imgs" / "0"
              / "sample_2.png")  # fmt: skip
    with pytest.raises(ValueError, match="sample_2.png does not exist") as e:
        lra.load_split("pathfinder", str(top), "train")
    assert "top-level" not in str(e.value)


# ---------------------------------------------------------- generate and score: args
@pytest.fixture
def lm_config_dir(tmp_path):
    from lrulm import config as config_lib

    (tmp_path / "config.json").write_text(config_lib.base_config().to_json())
    return tmp_path


def test_generate_arguments_refused_before_any_model_is_read(lm_config_dir, tmp_path):
    workdir = str(lm_config_dir)
    with pytest.raises(ValueError, match="batch_size must be positive; got 0"):
        gen.generate_texts(workdir, ["x"], batch_size=0)
    with pytest.raises(ValueError, match="a stop text is empty"):
        gen.generate_texts(workdir, ["x"], stop=("ok", ""))
    with pytest.raises(ValueError, match="give a step or best, not both"):
        gen.load_model(workdir, 4, best=True)
    with pytest.raises(ValueError, match="chunk must be positive; got 8, 0"):
        score_lib.score_texts(workdir, ["x"], chunk=0)
    with pytest.raises(ValueError, match="text 2 is empty; leave it out"):
        score_lib.score_texts(workdir, ["a", ""])
    config = json.loads((lm_config_dir / "config.json").read_text())
    other = tmp_path / "lra_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "task": "listops"}))
    with pytest.raises(ValueError, match="trained task 'listops'; generating and scoring"):
        gen.load_model(str(other))


def test_a_bidirectional_model_cannot_generate():
    from flax import nnx

    from lrulm.model import LanguageModel
    from lrulm.model_config import from_preset

    cfg = from_preset("test", vocab_size=16, bidirectional=True)
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))  # refused unread
    with pytest.raises(ValueError, match="a bidirectional model cannot generate"):
        gen.generate(model, [[3, 4]], max_new_tokens=2)


def test_prompt_files_by_suffix_in_any_case_and_a_text_field(tmp_path):
    path = tmp_path / "P.JSONL"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert gen.read_prompts(str(path)) == ["a", "b"]


def test_stop_texts_the_longer_at_one_place_and_settled_at_once():
    assert gen.cut_at_stop("a b:: c", (":", "::")) == ("a b", "::")
    assert gen.cut_at_stop("a b:: c", ("::", ":")) == ("a b", "::")
    pieces = []
    shown = gen.StreamedText(("ab",), pieces.append)
    assert not shown.update("xa")
    assert shown.update("xab")  # nothing can change the cut now: decoding may stop
    assert "".join(pieces) == "x"


# ----------------------------------------------------------------------- preemption
def test_the_watcher_takes_sigterm_and_puts_the_handler_back():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.Watcher() as watcher:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_agreed_timer(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(preemption, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.delenv("LRULM_TEST_CLOCK_PROCESS", raising=False)
    never = preemption.AgreedTimer(0)
    timer = preemption.AgreedTimer(1)  # minutes
    now[0] += 59.0
    assert not timer.due() and not never.due()
    now[0] += 1.0
    assert timer.due() and not never.due()
    timer.reset()
    assert not timer.due()
    now[0] += 60.0
    monkeypatch.setenv("LRULM_TEST_CLOCK_PROCESS", "1")  # another process's clock decides
    assert not timer.due()
    monkeypatch.setenv("LRULM_TEST_CLOCK_PROCESS", "0")
    assert timer.due()


# -------------------------------------------------------------------------- metrics
def test_brief_cuts_at_the_limit():
    assert metrics_lib.brief(ValueError("a" * 300)) == "ValueError: " + "a" * 300
    assert metrics_lib.brief(ValueError("a" * 301)) == "ValueError: " + "a" * 297 + "..."


def test_console_numbers_and_the_progress_bar(tmp_path, capsys):
    assert metrics_lib.MetricWriter._console({"a": 1e4, "b/c": 9999.0}) == "a 10,000 c 9999"
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
    writer.progress_line(20, 40, {})
    writer.progress_line(0, 0, {})
    writer.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[" + "#" * 12 + "-" * 12 + "] 20/40")
    assert lines[1].startswith("[" + "-" * 24 + "] 0/0")


def test_non_finite_metrics_are_written_as_text(tmp_path):
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True, progress=False)
    writer.write(3, {"loss": float("nan"), "x": float("inf"), "y": 2})
    writer.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=str.upper)
    assert row == {"step": 3, "loss": "nan", "x": "inf", "y": 2.0}


def test_tensorboard_hides_the_superseded_steps(tmp_path, monkeypatch):
    tensorboard = pytest.importorskip("tensorboardX")
    made = []

    class Writer:
        def __init__(self, logdir, **kwargs):
            made.append(kwargs)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tensorboard, "SummaryWriter", Writer)
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True, progress=False)
    for step in (5, 10, 15):
        writer.write(step, {"loss": 1.0})
    writer.close()
    metrics_lib.MetricWriter(str(tmp_path), enabled=True, progress=False, start_step=10).close()
    metrics_lib.MetricWriter(str(tmp_path), enabled=True, progress=False, fresh=True).close()
    assert made == [{}, {"purge_step": 11}, {"purge_step": 0}]


def test_throughput_per_step_between_log_points(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    meter = metrics_lib.Throughput()
    meter.start(10)
    meter.waited(0.5)
    meter.waited(1.5)
    now[0] = 8.0
    assert meter.measure(14, 1000) == {
        "perf/step_time_s": 2.0,
        "perf/tokens_per_s": 500.0,
        "perf/data_wait_s": 0.5,
    }
    now[0] = 9.0
    assert meter.measure(15, 1000)["perf/data_wait_s"] == 0.0  # counted afresh


def test_device_memory_without_a_limit_has_no_fraction():
    device = types.SimpleNamespace(memory_stats=lambda: {"bytes_in_use": 2**30})
    assert metrics_lib.device_memory([device]) == {
        "perf/memory_gib": 1.0,
        "perf/peak_memory_gib": 1.0,
    }


def test_the_profile_stops_after_the_windows_last_step(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
    window = metrics_lib.ProfileWindow(
        "logs", start_step=2, num_steps=2, run_from=0, total_steps=10
    )
    assert window.window == (2, 4)
    for step in range(1, 6):
        window.before(step, None)
        calls.append(step)
        window.after(step + 1, None)
    window.close()
    assert calls == [1, "start", 2, 3, "stop", 4, 5]
    assert "profile of steps 3..4 written under logs" in capsys.readouterr().out
