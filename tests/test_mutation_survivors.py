"""Behaviours the second mutation audit found unpinned: the held-out split's sizing at
train.eval_steps and seq_len, keep_best of an ArrayRecord set's bits per byte, the one-file
message, train-time loss_ctxN, init_from's tokenizer, the shared tokenizer's key and the
cache's use marks, LRA eval batches and loss, lra-report's ties and missing values."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_helpers import tiny_config

from lrulm import config as config_lib
from lrulm import lra_report, lra_task, tasks, workdir_tokenizer
from lrulm.data import cache as data_cache
from lrulm.data import lm as lm_data
from lrulm.data import tokenizer as tok
from lrulm.data.lra import synthetic as fx

OLD = 1_000_000_000  # an mtime long past (2001), in seconds


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two small real tokenizers ("a" of 300 pieces, "b" of more) and a text file to train on."""
    d = tmp_path_factory.mktemp("survivors-tok")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    for name, size in (("a", 300), ("b", 320)):
        tok.train_tokenizer(iter(texts), str(d / f"{name}.model"), vocab_size=size)
    train = d / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "content": t[::-1]}) + "\n" for t in texts))
    return {"a": str(d / "a.model"), "b": str(d / "b.model"), "train": str(train)}


def _lm_task(*overrides):
    return tasks.LMTask(tiny_config(*overrides), None, prepare_data=False)


def _stream(path, num_tokens, seed=0):
    """A TokenStream of num_tokens random ids (no EOS) saved at path."""
    tokens = np.random.default_rng(seed).integers(4, 500, num_tokens).astype(np.uint16)
    np.save(path, tokens)
    return data_cache.TokenStream(str(path), num_tokens, 3 * num_tokens, 1)


def _held_out(stream, seq_len):
    return tasks.HeldOut(
        [stream.path],
        lm_data.PackedSequences(stream, seq_len),
        lm_data.PackedSequences(stream, seq_len, keep_tail=True),
        stream.bytes_per_token,
        stream,
    )


# -- the held-out split's size ---------------------------------------------------------------


@pytest.mark.parametrize("full_batches, whole", [(2, True), (3, False)])
def test_a_split_one_batch_short_of_eval_steps_is_scored_whole_and_one_at_it_cut(
    tmp_path, capsys, full_batches, whole
):
    """train.eval_steps=3, batches of 8 x 64: a split of 2 full batches and a tail is
    scored whole (its tail too, every target once, padded to 3 batches); one of exactly 3
    full batches and a tail is cut at 3 batches (the tail not read)."""
    task = _lm_task("train.eval_steps=3")
    seq_len, batch = task.seq_len, 8
    stream = _stream(tmp_path / "eval.npy", full_batches * batch * seq_len + 11)
    task.held_out = {"eval": _held_out(stream, seq_len)}
    task.check_eval(batch, 3)
    said = "holds fewer than train.eval_steps=3" in capsys.readouterr().out
    kw = dict(global_batch=batch, row_offset=0, local_batch=batch, num_batches=3)
    batches = list(task.eval_batches("eval", **kw))
    targets = np.concatenate([b["targets"] for b in batches])
    scored = targets[targets != tok.PAD_ID]
    assert len(batches) == 3
    tokens = np.asarray(stream.tokens())
    if whole:
        np.testing.assert_array_equal(scored, tokens[1:])  # the tail's 10 targets too
    else:
        np.testing.assert_array_equal(scored, tokens[1 : 1 + 3 * batch * seq_len])
    assert not said  # either way as many batches as asked: nothing to say


@pytest.mark.parametrize("split", ["eval", "small"])
def test_a_split_of_exactly_seq_len_tokens_is_refused(tmp_path, split):
    """A held-out split needs seq_len + 1 tokens (one sequence and its last target):
    seq_len tokens are refused with the split's name, seq_len + 1 make one sequence."""
    task = _lm_task()
    seq_len = task.seq_len
    text = tmp_path / "held.txt"
    text.write_text("x = 1\n")
    tok_path = tmp_path / "tok.model"
    tok_path.write_bytes(b"any bytes: the fingerprint hashes them")
    stem = "eval" if split == "eval" else f"eval-{split}"
    cache = tmp_path / "run" / "data"
    cache.mkdir(parents=True)

    def tokenize(num_tokens):  # a cache entry of the file with num_tokens tokens, read
        stream = _stream(cache / f"{stem}.tokens.npy", num_tokens)
        fingerprint = data_cache._fingerprint([str(text)], str(tok_path))
        meta = dict(num_tokens=num_tokens, num_bytes=stream.num_bytes, num_docs=1,
                    fingerprint=fingerprint)  # fmt: skip
        (cache / f"{stem}.meta.json").write_text(json.dumps(meta))
        return task._tokenize({stem: [str(text)]}, str(tok_path), str(tmp_path / "run"), False)

    what = "eval" if split == "eval" else "data.eval_sets small"
    with pytest.raises(ValueError, match=f"the {what} split has {seq_len} tokens, fewer than"):
        tokenize(seq_len)
    stream = tokenize(seq_len + 1)[stem]
    assert stream.num_tokens == seq_len + 1
    assert len(lm_data.PackedSequences(stream, seq_len)) == 1


def test_one_train_file_without_eval_files_is_refused(tmp_path):
    """With data.eval_files empty a run holds out every 50th train file; one train file
    (or one per part of a mixture) leaves nothing to hold out: said, with what to set."""
    files = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"{name} = 1\n")
        files.append(str(tmp_path / f"{name}.txt"))
    (tmp_path / "run").mkdir()
    config = tiny_config(f"data.train_files={files[0]}", "data.eval_files=")
    with pytest.raises(
        ValueError, match="data.eval_files is empty and data.train_files names one file; give "
    ):
        tasks.make_task(config, str(tmp_path / "run"))
    config = tiny_config(f"data.mixture=x={files[0]}@1;y={files[1]}@1", "data.eval_files=")
    with pytest.raises(ValueError, match="empty and each part of data.mixture names one file"):
        tasks.make_task(config, str(tmp_path / "run"))


# -- metrics ---------------------------------------------------------------------------------


def test_keep_best_bits_per_byte_of_an_arrayrecord_set(tmp_path):
    """keep_best=NAME/bits_per_byte of an ArrayRecord eval set: refused while its shards'
    meta.json records no bytes (though the text eval split reports it), accepted once it
    does; the set's own split is what is checked."""
    task = _lm_task()
    text = _stream(tmp_path / "eval.npy", 1000)
    shards = [str(tmp_path / "held-00000-of-00001.arrayrecord")]

    def with_set():
        per_token = lm_data.shards_bytes_per_token(shards)
        packed = tasks.HeldOut(shards, None, None, per_token)
        task.held_out = {"eval": _held_out(text, 64), "packed": packed}
        task.held_out["eval"].exact_bytes = True
        return per_token

    assert with_set() is None
    with pytest.raises(ValueError, match="the packed split's evaluation reports no bits_per_byte"):
        tasks.check_best_metric(task, ("packed/bits_per_byte", "min"))
    tasks.check_best_metric(task, ("bits_per_byte", "min"))  # the text eval split's
    tasks.check_best_metric(task, ("packed/loss", "min"))
    with open(lm_data.shards_meta_path(str(tmp_path / "held")), "w") as f:
        json.dump({"tokens": 100, "bytes": 250}, f)
    assert with_set() == 2.5
    tasks.check_best_metric(task, ("packed/bits_per_byte", "min"))


class _Bigram:
    """A stand-in language model (random embedding and head; no recurrence): what
    LMTask.loss asks of a model, at no compile cost."""

    def __init__(self, vocab=64, width=8, seed=0):
        rng = np.random.default_rng(seed)
        self.embed = jnp.asarray(rng.normal(size=(vocab, width)), jnp.float32)
        self.head = jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32)

    def features(self, inputs, *, resets=None, train=False, key=None):
        return self.embed[inputs]

    def head_weight(self, dtype):
        return self.head.astype(dtype)


def test_train_steps_report_no_loss_by_context():
    """train.eval_by_context is an evaluation's: the train step's metrics (aux / weight,
    train/*) hold no loss_ctxN or tokens_ctxN, an evaluation's do."""
    task = _lm_task("train.eval_by_context=true")
    tokens = np.random.default_rng(1).integers(4, 64, (2, 17))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    _, _, trained = task.loss(_Bigram(), batch, train=True, key=jax.random.key(0))
    _, _, evaluated = task.loss(_Bigram(), batch, train=False, key=None)
    assert {"loss_ctx1", "tokens_ctx16"} <= set(evaluated)
    assert not [k for k in trained if k.startswith(("loss_ctx", "tokens_ctx"))], list(trained)


# -- tokenizers and the cache ----------------------------------------------------------------


def test_init_from_a_run_takes_its_tokenizer(tmp_path, tokenizers, capsys):
    """checkpoint.init_from a run's workdir (the whole model: its embedding rows are that
    run's ids) copies that run's tokenizer.model into the new workdir, none trained."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copyfile(tokenizers["b"], source / "tokenizer.model")
    config = tiny_config(f"checkpoint.init_from={source}", "data.vocab_size=300")
    workdir = tmp_path / "run"
    workdir.mkdir()
    path = workdir_tokenizer.prepare(config, str(workdir), [tokenizers["train"]])
    assert open(path, "rb").read() == (source / "tokenizer.model").read_bytes()
    pieces = tok.load_tokenizer(tokenizers["b"]).get_piece_size()
    assert tok.load_tokenizer(path).get_piece_size() == pieces != 300
    assert f"the tokenizer of checkpoint.init_from: {source}/tokenizer.model" in (
        capsys.readouterr().out
    )
    assert not (workdir / "tokenizer.json").exists()  # no record of one trained here


def test_a_given_tokenizer_removes_the_record_of_the_one_it_replaces(tmp_path, tokenizers):
    """A workdir's tokenizer trained there (tokenizer.json records what for) replaced by
    data.tokenizer (no checkpoint yet): the record goes with it, so a later start without
    data.tokenizer keeps the given one rather than taking it for a stale one of its own."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    own = tiny_config(f"data.train_files={tokenizers['train']}", "data.vocab_size=300")
    shutil.copyfile(tokenizers["a"], workdir / "tokenizer.model")
    spec = workdir_tokenizer._spec(own, [tokenizers["train"]])
    (workdir / "tokenizer.json").write_text(json.dumps(spec))
    given = tiny_config(f"data.tokenizer={tokenizers['b']}", "data.vocab_size=300")
    workdir_tokenizer.prepare(given, str(workdir), [tokenizers["train"]])
    assert (workdir / "tokenizer.model").read_bytes() == open(tokenizers["b"], "rb").read()
    assert not (workdir / "tokenizer.json").exists()
    workdir_tokenizer.prepare(own, str(workdir), [tokenizers["train"]])
    assert (workdir / "tokenizer.model").read_bytes() == open(tokenizers["b"], "rb").read()


def test_the_shared_tokenizer_is_keyed_by_the_text_field(tmp_path, tokenizers, capsys):
    """data.cache_dir's tokenizer for some files is that of the JSON field read: the same
    files read by another field (other text) never share it; a run of the same files and
    field takes the cached one and marks it used (tools/cache_dir.py --unused_days)."""
    cache = str(tmp_path / "cache")
    files = [tokenizers["train"]]

    def shared(*field):
        return workdir_tokenizer._shared(tiny_config(f"data.cache_dir={cache}", *field), files)

    paths = [shared(), shared("data.text_field=content"), shared("data.text_field=body")]
    assert len(set(paths)) == 3 and shared("data.text_field=content") == paths[1]
    assert shared("data.text_field=text") == paths[0]
    shutil.copyfile(tokenizers["b"], paths[1])
    os.utime(paths[1], (OLD, OLD))
    config = tiny_config(f"data.cache_dir={cache}", "data.text_field=content")
    (tmp_path / "run").mkdir()
    path = workdir_tokenizer.prepare(config, str(tmp_path / "run"), files)
    assert open(path, "rb").read() == open(tokenizers["b"], "rb").read()
    assert f"the tokenizer from data.cache_dir: {paths[1]}" in capsys.readouterr().out
    assert os.stat(paths[1]).st_mtime > OLD + 1e6


def test_a_cached_split_read_is_marked_used(tmp_path, tokenizers):
    """prepare_split reading an up-to-date entry of a shared cache (data.cache_dir) marks
    it used now (its meta.json's mtime, what tools/cache_dir.py evicts by); a run's own
    cache (workdir/data) is left as it is."""
    sp = tok.load_tokenizer(tokenizers["a"])
    files = [tokenizers["train"]]
    for shared in (True, False):
        cache = str(tmp_path / f"cache-{shared}")
        first = data_cache.prepare_split(files, sp, tokenizers["a"], cache, "eval", shared=shared)
        meta = os.path.join(cache, "eval.meta.json")
        os.utime(meta, (OLD, OLD))
        again = data_cache.prepare_split(files, sp, tokenizers["a"], cache, "eval", shared=shared)
        assert again == first
        assert (os.stat(meta).st_mtime > OLD + 1e6) == shared


# -- LRA ---------------------------------------------------------------------------------------


def _listops(tmp_path, *overrides):
    fx.write_listops(str(tmp_path), num=7)
    return config_lib.load_with_overrides(
        "configs/lra/listops.py:tiny",
        [("data.data_dir", str(tmp_path)), *(tuple(o.split("=", 1)) for o in overrides)],
    )


def test_lra_eval_batches_past_the_end_stop_at_the_split(tmp_path):
    """num_batches beyond a split's batches (7 examples: 2 batches of 4) gives those 2,
    every example once and the padding row weighted 0; fewer gives that many."""
    task = lra_task.ClassificationTask(_listops(tmp_path))
    kw = dict(global_batch=4, row_offset=0, local_batch=4)
    for asked, want in ((5, 2), (2, 2), (1, 1)):
        batches = list(task.eval_batches("eval", num_batches=asked, **kw))
        assert len(batches) == want
        assert sum(float(b["weight"].sum()) for b in batches) == min(7, 4 * want)


def test_lra_eval_loss_is_the_plain_cross_entropy_with_label_smoothing(tmp_path):
    """train.label_smoothing changes a classifier's training loss only: its evaluation's
    loss is the weighted cross-entropy of the labels themselves."""
    config = _listops(tmp_path, "train.label_smoothing=0.2")
    task = lra_task.ClassificationTask(config, prepare_data=False)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 10)), jnp.float32)
    model = lambda inputs, mask, *, train, key: logits  # noqa: E731 - a stand-in classifier
    batch = {
        "inputs": jnp.zeros((4, config.train.seq_len), jnp.int32),
        "mask": jnp.ones((4, config.train.seq_len), bool),
        "label": jnp.asarray([0, 3, 9, 1]),
        "weight": jnp.asarray([1.0, 1.0, 0.0, 1.0]),
    }
    loss, weight, aux = task.loss(model, batch, train=False, key=None)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    np.testing.assert_allclose(loss, jnp.sum(plain * batch["weight"]), rtol=1e-5)
    assert float(weight) == 3.0 and "cross_entropy" not in aux
    smoothed, _, _ = task.loss(model, batch, train=True, key=None)
    assert abs(float(smoothed) - float(loss)) > 1e-3  # the smoothing does change training's


# -- lra-report --------------------------------------------------------------------------------


def _run(workdir, test, val, **results):
    os.makedirs(workdir)
    row = {"task": "listops", "step": 10, "test/accuracy": test, "best/step": 5, **results}
    if val is not ...:
        row["best/eval_accuracy"] = val
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(row, f)
    return str(workdir)


def test_lra_report_ties_and_a_results_json_without_eval_accuracy(tmp_path):
    """Runs of one task tied on validation accuracy: the first given is reported.
    A results.json without best/eval_accuracy (not recorded) reads as unknown, ranks
    below any, and is not taken for a lost best checkpoint (its value null is)."""
    runs = [_run(tmp_path / n, test, 0.5) for n, test in (("a", 0.61), ("b", 0.72), ("c", 0.83))]
    chosen = lra_report.select([lra_report.load_run(r) for r in runs])
    assert chosen["listops"].workdir == runs[0]
    assert "| lrulm | 61.0* |" in lra_report.report(runs)
    chosen = lra_report.select([lra_report.load_run(r) for r in reversed(runs)])
    assert chosen["listops"].workdir == runs[2]
    unrecorded = lra_report.load_run(_run(tmp_path / "d", 0.9, ...))
    assert unrecorded.eval_accuracy is None and unrecorded.best_step == 5
    assert unrecorded.notes == ("no config.json: settings unknown",)
    lost = lra_report.load_run(_run(tmp_path / "e", 0.9, None))
    assert any("the best checkpoint was lost" in n for n in lost.notes)
    chosen = lra_report.select([unrecorded, lra_report.load_run(runs[1])])
    assert chosen["listops"].workdir == runs[1]
