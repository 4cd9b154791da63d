"""data.mixture: train data from several sources in fixed proportions."""

import json
import os

import grain
import numpy as np
import pytest
from run_helpers import tiny_config

from lrulm import tasks, train
from lrulm.data import lm as lm_data


class _Rows(grain.sources.RandomAccessDataSource):
    """Rows numbered from `base`: row i is [base + i] * 4."""

    def __init__(self, base: int, n: int):
        self.base, self.n = base, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        row = np.full(4, self.base + int(i), np.int32)
        return {"inputs": row, "targets": row}


def test_parse_mixture():
    assert lm_data.parse_mixture(" a=x/*.txt,y.txt@3 ; b-2=z.jsonl@1.5 ;") == [
        ("a", "x/*.txt,y.txt", 3.0), ("b-2", "z.jsonl", 1.5),
    ]  # fmt: skip
    assert lm_data.parse_mixture("") == []
    for bad, message in [
        ("a=x.txt", "is not NAME=GLOBS@WEIGHT"),
        ("a=x.txt@0;b=y@1", "data.mixture a: the weight must be positive; got '0'"),
        ("a=x.txt@w;b=y@1", "the weight must be positive; got 'w'"),
        ("a=x.txt@inf;b=y@1", "the weight must be positive; got 'inf'"),
        ("a=x@1;a=y@1", "names 'a' twice"),
        ("train=x@1;b=y@1", "'train' cannot name a part"),
        ("a=x@1", "has one part; give data.train_files"),
    ]:
        with pytest.raises(ValueError, match=message):
            lm_data.parse_mixture(bad)


def _rows(stream, batches):
    return np.concatenate([next(stream)["inputs"][:, 0] for _ in range(batches)])


def test_batches_hold_the_parts_in_proportion_each_part_reshuffled_each_epoch():
    """Weights 3:1 of a part of 10 rows and one of 1,000: every 40 rows hold 30 and 10
    (the small part repeated, each of its epochs in a new order); the position resumes."""
    mix = lm_data.Mixture({"a": _Rows(0, 10), "b": _Rows(10_000, 1000)}, {"a": 3.0, "b": 1.0})
    assert len(mix) == 1010
    stream = lm_data.TrainStream(mix, global_batch=8, row_offset=0, local_batch=8, seed=0)
    rows = _rows(stream, 50)
    for start in range(0, 400, 40):
        window = rows[start : start + 40]
        assert abs(int(np.sum(window < 10_000)) - 30) <= 1, window
    small = rows[rows < 10_000]
    epochs = [small[i : i + 10] for i in range(0, 100, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each epoch: every row once
    assert len({tuple(e) for e in epochs}) > 5  # in orders of their own
    big = rows[rows >= 10_000]
    assert len(set(big.tolist())) == len(big)  # no repeat within the first epoch
    again = lm_data.TrainStream(mix, global_batch=8, row_offset=0, local_batch=8, seed=0)
    again.set_state({"rows": 8 * 30})
    np.testing.assert_array_equal(_rows(again, 20), rows[8 * 30 :])
    other = lm_data.TrainStream(mix, global_batch=8, row_offset=0, local_batch=8, seed=1)
    assert not np.array_equal(_rows(other, 50), rows)


@pytest.fixture(scope="module")
def parts(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    lines = open(corpus["train"]).readlines()
    for name, chunk in (("a", lines[:30]), ("b", lines[30:])):
        (d / name).mkdir()
        for i, line in enumerate(chunk):
            (d / name / f"{i:03d}.jsonl").write_text(line)
    return d


def _mixture_config(corpus, parts, weights=(3, 1), *overrides):
    a, b = weights
    return tiny_config(
        "train.steps=2", "train.eval_every=2", "checkpoint.every_steps=2",
        "checkpoint.async_save=false", f"data.eval_files={corpus['eval']}",
        f"data.mixture=a={parts / 'a' / '*.jsonl'}@{a};b={parts / 'b' / '*.jsonl'}@{b}",
        *overrides,
    )  # fmt: skip


def test_a_run_trains_on_a_mixture_and_refuses_new_weights_on_resume(tmp_path, corpus, parts):
    """Each part is tokenized into data/train-NAME; the tokenizer learns from all of them;
    a resume with other weights is another data order, refused like other files."""
    workdir = tmp_path / "run"
    config = _mixture_config(corpus, parts)
    train.train_and_evaluate(config, str(workdir))
    files = sorted(os.listdir(workdir / "data"))
    assert {"train-a.tokens.npy", "train-b.tokens.npy", "eval.tokens.npy"} <= set(files)
    assert "train.tokens.npy" not in files
    rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    assert any("data/unigram_entropy" in r for r in rows)
    assert [r["step"] for r in rows if "eval/loss" in r] == [2]
    moved = _mixture_config(corpus, parts, (1, 1), "train.steps=4")
    with pytest.raises(ValueError, match="the train data's content"):
        train.train_and_evaluate(moved, str(workdir))


def test_mixture_settings_that_cannot_work_are_refused(tmp_path, corpus, parts, capsys):
    both = _mixture_config(corpus, parts, (1, 1), f"data.train_files={corpus['train']}")
    with pytest.raises(ValueError, match="data.train_files and data.mixture are both set"):
        tasks.make_task(both, str(tmp_path / "r1"))
    leak = _mixture_config(corpus, parts, (1, 1), f"data.eval_files={parts / 'a' / '001.jsonl'}")
    with pytest.raises(ValueError, match="data.eval_files and data.train_files share 1"):
        tasks.make_task(leak, str(tmp_path / "r2"))
    # Without eval files: every 50th file of each part is held out (here the first of each).
    held = _mixture_config(corpus, parts, (1, 1), "data.eval_files=")
    task = tasks.make_task(held, str(tmp_path / "r3"))
    assert task.eval_files == [str(parts / "a" / "000.jsonl"), str(parts / "b" / "000.jsonl")]
    assert str(parts / "a" / "000.jsonl") not in task.train_parts["a"]
    out = capsys.readouterr().out  # each named by its path: both are 000.jsonl
    a, b = parts / "a" / "000.jsonl", parts / "b" / "000.jsonl"
    assert f"holding out 2 of the 40 train files for evaluation ({a}, {b};" in out
    assert len(task.train_source) == sum(len(s) for s in task.train_source.sources.values())


def test_weights_that_mix_alike_are_one_mixture():
    """Grain mixes by integer proportions (the smallest weight as 100): 3:1 and 6:2 give
    one order and one fingerprint (a resume with either goes on); 3:1.5 another."""
    parts = {"a": _Rows(0, 10), "b": _Rows(10_000, 50)}
    orders = {}
    for w in ((3, 1), (6, 2), (3, 1.5)):
        mix = lm_data.Mixture(parts, dict(zip("ab", map(float, w))))
        stream = lm_data.TrainStream(mix, global_batch=4, row_offset=0, local_batch=4, seed=0)
        orders[w] = (_rows(stream, 10).tolist(), mix.fingerprint())
    assert orders[(3, 1)] == orders[(6, 2)] and orders[(3, 1)][1] != orders[(3, 1.5)][1]
    assert lm_data.Mixture(parts, {"a": 0.7, "b": 0.3}).proportions == [233, 100]
    # Grain's own integers (the smallest exactly 100, or it rescales them again).
    from grain._src.python.dataset.transformations import mix as grain_mix

    for a, b in ((0.44, 0.411), (0.653, 0.754), (3, 1)):
        ours = lm_data.Mixture(parts, {"a": a, "b": b})
        grains = grain_mix.SelectionWithProportionsMap(
            [grain.MapDataset.range(10)] * 2, ours.proportions
        )
        assert list(grains._proportions) == ours.proportions and min(ours.proportions) == 100


def test_each_part_is_shuffled_with_its_own_seed():
    """Two parts of the same size: their first epochs come in different orders."""
    mix = lm_data.Mixture({"a": _Rows(0, 100), "b": _Rows(10_000, 100)}, {"a": 1.0, "b": 1.0})
    stream = lm_data.TrainStream(mix, global_batch=8, row_offset=0, local_batch=8, seed=0)
    rows = _rows(stream, 25)
    a, b = rows[rows < 10_000][:100], rows[rows >= 10_000][:100] - 10_000
    assert sorted(a) == sorted(b) == list(range(100)) and list(a) != list(b)
