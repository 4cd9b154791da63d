"""How runs read their data: the order's own seed, a cache shared by a sweep."""

import os
import shutil
import subprocess
import sys

import pytest
from run_helpers import tiny_config as _config

from lrulm import evaluation, experiment, tasks, train


@pytest.mark.parametrize("seeds, want", [((0, -1), 0), ((0, 7), 7), ((3, -1), 3)])
def test_data_order_has_its_own_seed(tmp_path, corpus, monkeypatch, seeds, want):
    """data.seed orders the train data, train.seed initialises the model: either can vary
    alone; -1 (the default) takes train.seed, as runs did before data.seed existed."""
    seen = []
    real = tasks.LMTask.train_batches

    def spy(self, *, seed, **kw):
        seen.append(seed)
        return real(self, seed=seed, **kw)

    monkeypatch.setattr(tasks.LMTask, "train_batches", spy)
    train_seed, seed = seeds
    config = _config(
        f"train.seed={train_seed}", f"data.seed={seed}", "train.steps=1", corpus=corpus
    )
    assert experiment.data_seed(config) == want
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert seen == [want]


def test_runs_sharing_a_cache_dir_prepare_the_data_once(tmp_path, corpus, monkeypatch, capsys):
    """data.cache_dir: the second run of a sweep on the same corpus copies the tokenizer
    the first trained and reads its tokenized splits (nothing trained or tokenized again,
    no data/ in its workdir)."""
    from lrulm.data import cache as data_cache
    from lrulm.data import tokenizer as tok

    calls = {"tokenizer": 0, "tokenize": 0}
    real_train, real_tokenize = tok.train_tokenizer, data_cache.tokenize_files

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(tok, "train_tokenizer", count("tokenizer", real_train))
    monkeypatch.setattr(data_cache, "tokenize_files", count("tokenize", real_tokenize))
    cache = tmp_path / "cache"
    own = {}  # a copy of the corpus: this test edits it
    for split, path in corpus.items():
        own[split] = str(tmp_path / os.path.basename(path))
        shutil.copyfile(path, own[split])
    corpus = own
    for run, lr in (("a", "1e-3"), ("b", "3e-3")):  # a sweep over the learning rate
        config = _config(
            "train.steps=1", f"optim.lr={lr}", f"data.cache_dir={cache}", corpus=corpus
        )
        train.train_and_evaluate(config, str(tmp_path / run))
        if run == "a":
            assert calls == {"tokenizer": 1, "tokenize": 2}
    assert calls == {"tokenizer": 1, "tokenize": 2}, calls
    assert "the tokenizer from data.cache_dir" in capsys.readouterr().out
    a, b = (open(tmp_path / r / "tokenizer.model", "rb").read() for r in "ab")
    assert (
        a == b and not (tmp_path / "a" / "data").exists() and not (tmp_path / "b" / "data").exists()
    )
    names = sorted(p.name for p in cache.iterdir())
    assert len([n for n in names if n.endswith(".tokens.npy")]) == 2 and not any(
        "tmp" in n for n in names
    )
    # `lrulm eval` of run b reads the shared eval split too.
    evaluation.evaluate_workdir(config, str(tmp_path / "b"))
    assert calls["tokenize"] == 2
    # An edited corpus (here: only its time) gets a tokenizer and a split of its own.
    os.utime(corpus["train"])
    train.train_and_evaluate(config, str(tmp_path / "c"))
    assert calls == {"tokenizer": 2, "tokenize": 3}, calls
    # tools/cache_dir.py: the entries of the edited corpus's old version are stale (their
    # train file changed); --prune removes them and the current ones still serve run c.
    tool = [sys.executable, "tools/cache_dir.py", str(cache)]
    listed = subprocess.run(tool, capture_output=True, text=True, check=True).stdout
    states = sorted(line.split()[0] + " " + line.split()[-5] for line in listed.splitlines())
    assert states == ["split changed", "split current", "split current",
                      "tokenizer changed", "tokenizer current"], listed  # fmt: skip
    pruned = subprocess.run([*tool, "--prune"], capture_output=True, text=True, check=True)
    assert pruned.stdout.count("removed ") == 2 and "removed" in pruned.stderr
    assert len(list(cache.iterdir())) == len(names)  # 2 of 5 entries removed, 4 files
    train.train_and_evaluate(config, str(tmp_path / "c"))
    assert calls == {"tokenizer": 2, "tokenize": 3}, calls
    subprocess.run([*tool, "--prune", "--unused_days", "0"], check=True, capture_output=True)
    assert list(cache.iterdir()) == []


def test_cache_dir_tool_on_odd_entries(tmp_path):
    """tools/cache_dir.py: a killed run's temporaries (a day old) are pruned; a prepared
    shard set's meta.json is no entry; malformed or unreadable sources are "unknown" and
    kept; sources whose directory is gone (an unmounted corpus) are "unknown" too."""
    import json
    import time

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import cache_dir

    d = tmp_path / "cache"
    d.mkdir()
    old = time.time() - 2 * 86400
    for name in ("train-x.tokens.npy.1a2b.tmp.npy", "eval-y.meta.json.3c4d.tmp"):
        (d / name).write_bytes(b"x" * 10)
        os.utime(d / name, (old, old))
    (d / "fresh.meta.json.5e6f.tmp").write_text("{}")  # a run writing now
    (d / "shards.meta.json").write_text(json.dumps({"tokens": 5, "bytes": 9}))
    (d / "bad.meta.json").write_text(json.dumps({"fingerprint": "f", "sources": [["/x", 1]]}))
    gone_dir = [[str(tmp_path / "unmounted" / "a.txt"), 1, 1]]
    (d / "far.meta.json").write_text(json.dumps({"fingerprint": "f", "sources": gone_dir}))
    deleted = [[str(tmp_path / "deleted.txt"), 1, 1]]
    (d / "gone.meta.json").write_text(json.dumps({"fingerprint": "f", "sources": deleted}))
    found = {e["name"]: e for e in cache_dir.entries(str(d))}
    assert "shards" not in found
    assert {n: e["sources"] for n, e in found.items() if e["kind"] == "split"} == {
        "bad": "unknown", "far": "unknown", "gone": "gone",
    }  # fmt: skip
    cache_dir.main([str(d), "--prune"])
    left = sorted(p.name for p in d.iterdir())
    assert left == [
        "bad.meta.json",
        "far.meta.json",
        "fresh.meta.json.5e6f.tmp",
        "shards.meta.json",
    ]


def test_cache_dir_tool_on_a_folder_that_is_no_cache(tmp_path, capsys):
    """tools/cache_dir.py given a corpus folder or a run's workdir: said it holds no cache
    entries (not "0 entries" alone); an empty folder (a new cache) is just empty."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import cache_dir

    for name, files in (("new", []), ("corpus", ["a.txt"]), ("run", ["config.json"])):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")
        cache_dir.main([str(tmp_path / name)])
        err = capsys.readouterr().err
        assert err.startswith("0 entries") == (name == "new"), err
        assert ("not a data.cache_dir" in err) == (name != "new")
        assert ("is a run's workdir" in err) == (name == "run")
