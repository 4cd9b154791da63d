"""LM data: tokenizer round trips, packing, per-process rows, resume, ArrayRecord, errors."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lrulm.data import cache as data_cache
from lrulm.data import documents
from lrulm.data import lm as lm_data
from lrulm.data import tokenizer as tok

CODE = 'class A:\n    def f(self, x):\n        return x  # 42\n\n\tif x:\n  print("é")\n'


@pytest.fixture(scope="module")
def sp(tmp_path_factory, corpus):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    docs = list(documents.read_documents(corpus["train"]))
    return tok.train_tokenizer(docs, path, vocab_size=512)


def test_tokenizer_round_trips_code_exactly(sp):
    for text in (CODE, "x = [1, 2,  3]\r\n", "日本語 and ünïcödé\n\n\n"):
        assert sp.decode(sp.encode(text)) == text
    assert sp.encode("\n") == [sp.piece_to_id("\n")]  # a newline is one token
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)


def test_workdir_tokenizer_made_for_other_data_is_trained_again(tmp_path, corpus):
    """A fresh run in a workdir whose tokenizer an earlier run made for another
    vocab_size or corpus trains a new one (it was reused as it was); once checkpoints use
    it, it is kept and the difference said."""
    from lrulm import config as config_lib
    from lrulm import tasks

    def task(vocab, train_file):
        config = config_lib.load_with_overrides(
            "configs/lm/tiny.py:test",
            [("data.train_files", train_file), ("data.eval_files", corpus["eval"]),
             ("data.vocab_size", str(vocab))],
        )  # fmt: skip
        return tasks.make_task(config, str(tmp_path / "run"))

    assert task(400, corpus["train"]).sp.get_piece_size() == 400
    assert json.loads((tmp_path / "run" / "tokenizer.json").read_text())["vocab_size"] == 400
    assert task(500, corpus["train"]).sp.get_piece_size() == 500
    other = tmp_path / "other.jsonl"  # same vocabulary, another corpus
    other.write_text("".join(open(corpus["train"]).readlines()[:20]))
    model = tmp_path / "run" / "tokenizer.model"
    before = model.read_bytes()
    task(500, str(other))
    assert model.read_bytes() != before
    (tmp_path / "run" / "checkpoints" / "10").mkdir(parents=True)  # now a run uses it
    assert task(600, str(other)).sp.get_piece_size() == 500


def test_tokenizer_vocab_too_small_for_the_characters(tmp_path):
    texts = ["".join(chr(0x4E00 + i) for i in range(j, j + 50)) for j in range(0, 600, 50)]
    with pytest.raises(
        ValueError, match=r"vocab_size 300 is too small for this corpus: .* need 861"
    ):
        tok.train_tokenizer(texts, str(tmp_path / "t.model"), vocab_size=300)
    assert tok.train_tokenizer(texts, str(tmp_path / "t.model"), vocab_size=861)
    # One message names the whole need, before SentencePiece runs: not 300 first, then 861.
    with pytest.raises(ValueError, match="600 distinct characters .* use at least 861"):
        tok.train_tokenizer(texts, str(tmp_path / "t.model"), vocab_size=256)
    # A space and SentencePiece's own escape for it (U+2581) are one piece.
    texts = [t + " \u2581" for t in texts]
    with pytest.raises(ValueError, match="601 distinct characters .* need 862"):
        tok.train_tokenizer(texts, str(tmp_path / "t.model"), vocab_size=861)
    assert tok.train_tokenizer(texts, str(tmp_path / "t.model"), vocab_size=862)
    with pytest.raises(ValueError, match="byte and control pieces leave .* use at least 300"):
        tok.train_tokenizer(["abc def"], str(tmp_path / "t.model"), vocab_size=299)


def test_default_corpus_is_deterministic_and_split():
    train, held = lm_data.default_corpus()
    train2, held2 = lm_data.default_corpus()
    assert train == train2 and held == held2
    # No file of the interpreter's own build (its paths and compiler flags).
    names = [os.path.basename(f) for f in train + held]
    assert not any(n.startswith("_sysconfigdata") for n in names)
    assert not any(os.sep + "config-" in f for f in train + held)
    assert not set(train) & set(held) and 0.01 < len(held) / len(train) < 0.05
    assert all(f.endswith(".py") and "site-packages" not in f for f in train + held)


def test_packing_and_document_resets(tmp_path, sp):
    docs = tmp_path / "docs.jsonl"
    texts = ["def a():\n    return 1\n", "import os\n", "x = 2\n" * 5]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stream = data_cache.prepare_split(
        [str(docs)], sp, sp_path(sp, tmp_path), str(tmp_path / "c"), "train"
    )
    tokens = np.asarray(stream.tokens())
    expected = np.concatenate([sp.encode(t) + [tok.EOS_ID] for t in texts])
    np.testing.assert_array_equal(tokens, expected)
    assert stream.num_docs == 3 and stream.num_bytes == sum(len(t.encode()) for t in texts)
    seqs = lm_data.PackedSequences(stream, 8)
    assert len(seqs) == (len(tokens) - 1) // 8
    for i in range(len(seqs)):
        np.testing.assert_array_equal(seqs[i]["inputs"], tokens[8 * i : 8 * i + 8])
        np.testing.assert_array_equal(seqs[i]["targets"], tokens[8 * i + 1 : 8 * i + 9])


def sp_path(sp, tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(sp.serialized_model_proto())
    return str(path)


def _source(n):
    class Source:
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"inputs": np.full((4,), i, np.int32)}

    return Source()


def test_processes_read_disjoint_rows_that_make_the_global_batch():
    g, steps = 8, 12  # 12 steps of 8 rows over 40 examples: three epochs
    single = lm_data.batches(_source(40), global_batch=g, row_offset=0, local_batch=g, seed=3)
    parts = [
        lm_data.batches(_source(40), global_batch=g, row_offset=o, local_batch=4, seed=3)
        for o in (0, 4)
    ]
    epochs = []
    for _ in range(steps):
        whole = next(single)["inputs"][:, 0]
        halves = [next(p)["inputs"][:, 0] for p in parts]
        np.testing.assert_array_equal(np.concatenate(halves), whole)
        epochs.append(whole)
    flat = np.concatenate(epochs)
    assert sorted(flat[:40]) == list(range(40))  # each epoch visits every example once
    assert not np.array_equal(flat[:40], flat[40:80])  # and reshuffles


def test_iterator_state_resumes_exactly():
    it = lm_data.batches(_source(40), global_batch=8, row_offset=0, local_batch=8, seed=0)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(5)]
    fresh = lm_data.batches(_source(40), global_batch=8, row_offset=0, local_batch=8, seed=0)
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], want)


def _stream(global_batch, row_offset=0, local_batch=None, n=40):
    return lm_data.TrainStream(
        _source(n), global_batch=global_batch, row_offset=row_offset,
        local_batch=local_batch or global_batch, seed=5,
    )  # fmt: skip


def test_train_stream_resumes_at_the_same_row_with_another_batch_size():
    """The position is rows consumed: 7 steps of 8 then batches of 12 (or 2 processes of
    6) read on exactly where batches of 8 would have, across epoch ends, every row once."""
    reference = _stream(8)
    order = np.concatenate([next(reference)["inputs"][:, 0] for _ in range(20)])
    first = _stream(8)
    seen = [next(first)["inputs"][:, 0] for _ in range(7)]
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint writes it
    assert state == {"rows": 56, "global_batch": 8}
    bigger = _stream(12)
    bigger.set_state(state)
    halves = [_stream(12, o, 6) for o in (0, 6)]
    for h in halves:
        h.set_state(json.dumps(state).encode())  # Grain's handler passes bytes
    for _ in range(7):
        batch = next(bigger)["inputs"][:, 0]
        np.testing.assert_array_equal(
            np.concatenate([next(h)["inputs"][:, 0] for h in halves]), batch
        )
        seen.append(batch)
    np.testing.assert_array_equal(np.concatenate(seen), order[: 56 + 84])
    assert bigger.get_state() == {"rows": 140, "global_batch": 12}
    # 140 rows = 3.5 epochs of 40: each epoch is a permutation, and they differ.
    assert sorted(order[:40]) == sorted(order[40:80]) == list(range(40))


def test_train_stream_reads_positions_of_older_checkpoints_and_refuses_bad_ones():
    old = _stream(8)
    old.set_state({"next_index": 3})  # steps of this stream's batch
    new = _stream(8)
    new.set_state({"rows": 24})
    np.testing.assert_array_equal(next(old)["inputs"], next(new)["inputs"])
    other = _stream(12)
    other.set_state({"next_index": 3, "global_batch": 8})  # steps of 8 rows
    assert other.rows == 24
    for bad in ({"step": 3}, {"rows": -1}):
        with pytest.raises(ValueError, match="data position"):
            other.set_state(bad)


def test_arrayrecord_windows_equal_the_token_stream(tmp_path, sp, corpus):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import prepare_data

    files = [corpus["eval"]]
    texts = [d for f in files for d in documents.read_documents(f)]
    info = prepare_data.write_shards(
        texts, sp, seq_len=16, output=str(tmp_path / "ev"), num_shards=3
    )
    packed = lm_data.ArrayRecordSequences(info["files"], 16)
    stream = data_cache.prepare_split(files, sp, sp_path(sp, tmp_path), str(tmp_path / "c"), "ev")
    ref = lm_data.PackedSequences(stream, 16)
    # Every full window, then the partial last one filled up with PAD.
    assert len(packed) == len(ref) + 1 == info["sequences"]
    # Round-robin shards: record r of shard s is window r * 3 + s of the stream.
    got = {}
    for s, path in enumerate(info["files"]):
        one = lm_data.ArrayRecordSequences([path], 16)
        for r in range(len(one)):
            got[r * 3 + s] = one[r]
    for i in range(len(ref)):
        np.testing.assert_array_equal(got[i]["inputs"], ref[i]["inputs"])
    real = got[len(ref)]["targets"] != tok.PAD_ID
    # Every target of the stream is scored once: the full windows' and the tail's.
    assert 16 * len(ref) + real.sum() == stream.num_tokens - 1
    assert real[: real.sum()].all()  # the PAD comes after the real tokens
    with pytest.raises(ValueError, match="train.seq_len is 32"):
        lm_data.ArrayRecordSequences(info["files"], 32)
    # The set's meta.json: the text's bytes per token, as the token stream counts them.
    assert lm_data.shards_bytes_per_token(info["files"][:1]) == stream.bytes_per_token
    os.remove(lm_data.shards_meta_path(str(tmp_path / "ev")))  # shards from before it
    assert lm_data.shards_bytes_per_token(info["files"]) is None


def test_training_from_arrayrecord(tmp_path, sp, corpus):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import prepare_data

    from lrulm import config as config_lib
    from lrulm import train

    prefixes = {}
    for name in ("train", "eval"):
        texts = list(documents.read_documents(corpus[name]))
        prepare_data.write_shards(texts, sp, seq_len=64, output=str(tmp_path / name), num_shards=2)
        prefixes[name] = str(tmp_path / f"{name}-*.arrayrecord")
    pairs = [
        ("data.train_files", prefixes["train"]),
        ("data.eval_files", prefixes["eval"]),
        ("data.tokenizer", sp_path(sp, tmp_path)),
        ("train.steps", "3"),
        ("train.eval_every", "3"),
        ("mesh.data", "8"),
    ]
    config = config_lib.load_with_overrides("configs/lm/tiny.py:test", pairs)
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(result["loss"])
    text = data_cache.prepare_split(
        [corpus["eval"]], sp, sp_path(sp, tmp_path), str(tmp_path / "c"), "e"
    )
    want = result["loss"] / np.log(2) / text.bytes_per_token
    assert result["bits_per_byte"] == pytest.approx(want, rel=1e-6)


def test_bad_json_lines_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text'"):
        list(documents.read_documents(str(bad)))
    bad.write_text('{"text": "ok"}\n\n{"text": null}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: the 'text' field is null, not a string"):
        list(documents.read_documents(str(bad)))
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not UTF-8 text \(byte 10: .*iconv"):
        list(documents.read_documents(str(bad)))
    bad.write_text('{"text": "caf\u00e9"}\r\n{"text": ""}\n')
    assert list(documents.read_documents(str(bad))) == ["café"]
    # Plain text too: Latin-1 bytes are an error naming the file, not U+FFFD trained on;
    # line ends stay as written.
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Café naïve\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 text \(byte 3: .*iconv"):
        list(documents.read_documents(str(latin)))
    latin.write_bytes("Café\r\nnaïve\n".encode())
    assert list(documents.read_documents(str(latin))) == ["Café\r\nnaïve\n"]


def test_tokenizer_cli(tmp_path, corpus, lrulm_here):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrulm",
            "tokenizer",
            "train",
            "--input",
            corpus["eval"],
            "--output",
            str(tmp_path / "t.model"),
            "--vocab_size",
            "400",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "t.model: 400 pieces" in out.stdout
    assert tok.load_tokenizer(str(tmp_path / "t.model")).get_piece_size() == 400
    bad = lrulm_here("tokenizer", "train", "--input", str(tmp_path / "none*.txt"),
                     "--output", str(tmp_path / "u.model"))  # fmt: skip
    assert bad.returncode == 2 and "matches no files" in bad.stderr


def test_tokenizer_learns_from_long_lines(tmp_path):
    """SentencePiece drops sentences over 4192 bytes: a corpus of long lines (a paragraph
    per line) crashed it, or left its words out of the vocabulary."""
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur"]
    line = " ".join(words[i % 6] for i in range(3000))  # ~18 KB on one line
    sp = tok.train_tokenizer([line, "a short line\n"], str(tmp_path / "t.model"), vocab_size=320)
    assert len(sp.encode(" consectetur")) == 1  # a word of the long lines is one piece
    for limit in (16, 64):
        text = "wörd " * 40 + "日本語" * 30 + "x" * 100
        pieces = list(tok._split_long(text, limit))
        assert "".join(pieces) == text and len(pieces) > 1
        assert all(len(p.encode("utf-8")) <= limit for p in pieces)


def test_tokenizer_output_paths(tmp_path):
    texts = ["def f(x):\n    return x\n"] * 20
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        tok.train_tokenizer(texts, str(tmp_path), vocab_size=300)
    assert tok.train_tokenizer(texts, str(tmp_path / "new" / "t.model"), vocab_size=300)


def test_lone_surrogate_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the 'text' field is not valid Unicode"):
        list(documents.read_documents(str(bad)))


def test_prepare_data_bad_arguments(tmp_path, sp, monkeypatch, tool_here):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import prepare_data

    class BoundedWriter(prepare_data.ArrayRecordWriter):
        """Fails a run that would write the same record until the disk is full."""

        def __init__(self, *args):
            super().__init__(*args)
            self.count = 0

        def write(self, record):
            self.count += 1
            assert self.count < 10_000, "writes without end"
            super().write(record)

    monkeypatch.setattr(prepare_data, "ArrayRecordWriter", BoundedWriter)
    texts = ["x = 1\n" * 50]
    for kwargs, message in [
        (dict(seq_len=0, num_shards=1), "--seq_len must be positive"),  # it looped forever
        (dict(seq_len=8, num_shards=0), "--num_shards must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            prepare_data.write_shards(texts, sp, output=str(tmp_path / "a"), **kwargs)
        for f in os.listdir(tmp_path):
            os.remove(tmp_path / f)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        prepare_data.write_shards(texts, sp, seq_len=4096, output=str(tmp_path / "b"), num_shards=2)
    assert os.listdir(tmp_path) == []  # no empty shards left for a glob to pick up
    bad = iter(texts * 3 + [None])  # a failure after some sequences are written
    with pytest.raises(TypeError):
        prepare_data.write_shards(bad, sp, seq_len=8, output=str(tmp_path / "c"), num_shards=2)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="--output is a path prefix, not a directory"):
        prepare_data.write_shards(texts, sp, seq_len=8, output=str(tmp_path), num_shards=2)
    out = tool_here(
        "tools/prepare_data.py", "--input", str(tmp_path / "none*"),
        "--tokenizer", str(tmp_path / "t.model"), "--seq_len", "8", "--output", "x",
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "prepare_data: error: no tokenizer at" in out.stderr


def test_eval_files_held_out_from_train_files_are_named(tmp_path, corpus, capsys):
    """Without data.eval_files, every 50th train file is held out, and which is said (with
    two files that is half the data)."""
    from lrulm import config as config_lib
    from lrulm import tasks

    docs = open(corpus["train"]).readlines()
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text("".join(docs[i::2]))
    config = config_lib.load_with_overrides(
        "configs/lm/tiny.py:test",
        [("data.train_files", str(tmp_path / "part*.jsonl")), ("data.vocab_size", "400")],
    )
    task = tasks.make_task(config, str(tmp_path / "run"))
    assert task.eval_files == [str(tmp_path / "part0.jsonl")]
    assert task.train_files == [str(tmp_path / "part1.jsonl")]
    out = capsys.readouterr().out
    held = tmp_path / "part0.jsonl"  # named by its path: a file name alone can be ambiguous
    assert f"holding out 1 of the 2 train files for evaluation ({held}; 41" in out
    assert "% of the bytes (a large share: with few files, give held-out files)" in out


def test_json_lines_by_any_suffix_compressed_or_with_a_byte_order_mark(tmp_path):
    """JSON lines are found by .jsonl/.json/.ndjson/.jsonlines in any case (they were
    read as plain text: the model trained on JSON syntax), gzip files are read through,
    a byte-order mark is not text, and a JSON array or an ArrayRecord file named as text
    says what to do."""
    import gzip

    lines = '{"text": "def f():\\n    return 1\\n", "id": 7}\n{"text": "x = 2\\n"}\n'
    want = ["def f():\n    return 1\n", "x = 2\n"]
    for name in ("a.JSONL", "a.ndjson", "a.jsonlines", "a.Json"):
        (tmp_path / name).write_text(lines)
        assert list(documents.read_documents(str(tmp_path / name))) == want, name
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    assert list(documents.read_documents(str(tmp_path / "a.jsonl.gz"))) == want
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("plain\ntext\n")
    assert list(documents.read_documents(str(tmp_path / "b.txt.gz"))) == ["plain\ntext\n"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert list(documents.read_documents(str(tmp_path / "bom.jsonl"))) == want
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert list(documents.read_documents(str(tmp_path / "bom.txt"))) == ["hello\n"]
    (tmp_path / "array.json").write_text('[\n  {"text": "a"}\n]\n')
    with pytest.raises(ValueError, match=r"array.json holds a JSON array; .* jq -c '\.\[\]'"):
        list(documents.read_documents(str(tmp_path / "array.json")))
    # The command it gives writes another file, of a name the reader takes as JSON lines.
    converted = {
        "array.jsonl": "jq -c '.[]' {d}/array.jsonl > {d}/array.lines.jsonl",
        "array.jsonl.gz": "gunzip -c {d}/array.jsonl.gz | jq -c '.[]' > {d}/array.jsonl",
        "pretty.json": "jq -c '.' {d}/pretty.json > {d}/pretty.jsonl",
    }
    (tmp_path / "array.jsonl").write_text('[{"text": "a"}]\n')
    with gzip.open(tmp_path / "array.jsonl.gz", "wt") as f:
        f.write('[{"text": "a"}]\n')
    (tmp_path / "pretty.json").write_text('{\n  "text": "a"\n}\n')
    for name, command in converted.items():
        with pytest.raises(ValueError) as e:
            list(documents.read_documents(str(tmp_path / name)))
        assert str(e.value).endswith(command.format(d=tmp_path)), str(e.value)
    for value, said in (("5", "a number"), ("null", "null"), ('["a"]', "an array")):
        (tmp_path / "typed.jsonl").write_text(f'{{"text": {value}}}\n')
        with pytest.raises(ValueError, match=f"typed.jsonl:1: the 'text' field is {said}, not"):
            list(documents.read_documents(str(tmp_path / "typed.jsonl")))
    (tmp_path / "p.arrayrecord").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match=r"p.arrayrecord is ArrayRecord .*, not text"):
        list(documents.read_documents(str(tmp_path / "p.arrayrecord")))


def test_globs_list_a_file_once_and_eval_files_must_not_be_train_files(tmp_path):
    for name in ("part0.jsonl", "part1.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    pattern = f"{tmp_path}/*.jsonl,{tmp_path}/part0.jsonl"
    assert lm_data.expand_globs(pattern, "data.train_files") == [
        str(tmp_path / "part0.jsonl"),
        str(tmp_path / "part1.jsonl"),
    ]
    lm_data.check_disjoint([str(tmp_path / "part1.jsonl")], [str(tmp_path / "part0.jsonl")])
    with pytest.raises(ValueError, match=r"share 1 file\(s\) \(.*part0.jsonl\): their evaluation"):
        lm_data.check_disjoint(
            lm_data.expand_globs(pattern, "t"), [str(tmp_path / "." / "part0.jsonl")]
        )


def test_prepare_data_replaces_an_earlier_runs_shards(tmp_path, sp):
    """A second prepare_data run with another shard count removes the first run's shards
    (the glob `train-*.arrayrecord` read both: the corpus twice, or a failure mid-training
    with another seq_len); shards of two runs given together are refused, and every
    file's sequence length is checked, not only the first's."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import prepare_data

    texts = ["def f(x):\n    return x + 1\n" * 40]
    out = str(tmp_path / "train")
    other = str(tmp_path / "train-2")  # another prefix that a loose glob would match
    kept = prepare_data.write_shards(texts, sp, seq_len=16, output=other, num_shards=2)
    first = prepare_data.write_shards(texts, sp, seq_len=16, output=out, num_shards=3)
    second = prepare_data.write_shards(texts, sp, seq_len=16, output=out, num_shards=2)
    assert second["removed"] == first["files"]
    left = sorted(str(p) for p in tmp_path.iterdir())
    assert left == sorted(second["files"] + kept["files"] + [second["meta"], kept["meta"]])
    assert len(lm_data.ArrayRecordSequences(second["files"], 16)) == first["sequences"]
    stale = str(tmp_path / "train-00002-of-00003.arrayrecord")
    shutil.copy(kept["files"][0], stale)  # as if an older run's shard had been left
    with pytest.raises(ValueError, match=r"shards of 2 tools/prepare_data.py runs"):
        lm_data.ArrayRecordSequences(second["files"] + [stale], 16)
    longer = prepare_data.write_shards(
        texts, sp, seq_len=32, output=str(tmp_path / "l"), num_shards=1
    )
    with pytest.raises(ValueError, match=r"l-00000-of-00001.arrayrecord holds sequences of 32"):
        lm_data.ArrayRecordSequences(second["files"] + longer["files"], 16)


def test_a_resume_given_another_tokenizer_changes_nothing(tmp_path, corpus, sp):
    """data.tokenizer naming another tokenizer than the one a workdir's checkpoints were
    trained with is refused before the workdir's own is replaced (it was overwritten, and
    the run could then not be resumed as it was); ArrayRecord data without a tokenizer
    says so before any tokenizer is trained on its bytes."""
    from lrulm import config as config_lib
    from lrulm import tasks

    def task(*pairs):
        config = config_lib.load_with_overrides(
            "configs/lm/tiny.py:test",
            [("data.train_files", corpus["train"]), ("data.eval_files", corpus["eval"]),
             ("data.vocab_size", "400"), *pairs],
        )  # fmt: skip
        return tasks.make_task(config, str(tmp_path / "run"))

    task()
    own = tmp_path / "run" / "tokenizer.model"
    before = own.read_bytes()
    task(("data.tokenizer", sp_path(sp, tmp_path)))  # no checkpoint yet: it is replaced
    assert own.read_bytes() != before
    own.write_bytes(before)
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"is not .*tokenizer.model, the tokenizer this workdir"):
        task(("data.tokenizer", sp_path(sp, tmp_path)))
    assert own.read_bytes() == before and (tmp_path / "run" / "tokenizer.json").exists()
    same = tmp_path / "same.model"
    same.write_bytes(before)
    assert task(("data.tokenizer", str(same))).sp.get_piece_size() == 400
    for name in ("x", "y"):
        (tmp_path / f"{name}-00000-of-00001.arrayrecord").write_bytes(b"\x00")
    with pytest.raises(
        ValueError, match=r"ArrayRecord data \(.*\) needs the tokenizer it was prepared"
    ):
        task(("data.train_files", str(tmp_path / "x-*.arrayrecord")),
             ("data.eval_files", str(tmp_path / "y-*.arrayrecord")))  # fmt: skip


def test_unigram_entropy_counts_a_slice_at_a_time(monkeypatch):
    """The step-0 entropy counts the on-disk tokens in slices (not one int64 copy of the
    whole corpus), with the same result however they are sliced; a mixture's is that of
    its parts' distributions mixed by the weights."""
    import types

    from lrulm import tasks

    tokens = np.random.default_rng(0).integers(0, 3000, 100_003).astype(np.uint16)
    tokens[-1] = 4000  # the largest id in the last slice only
    stream = types.SimpleNamespace(tokens=lambda: tokens)
    sp = types.SimpleNamespace(get_piece_size=lambda: 4096)
    fake = types.SimpleNamespace(train_streams={"train": stream}, mixture_weights={}, sp=sp)
    counts = np.bincount(tokens)
    p = counts[counts > 0] / counts.sum()
    expected = float(-(p * np.log(p)).sum())
    for size in (1 << 24, 1000, 7):
        monkeypatch.setattr(data_cache, "COUNT_SLICE", size)
        assert tasks.LMTask.unigram_entropy(fake) == pytest.approx(expected, rel=1e-12)
    # Two parts of disjoint ids, weighted 3:1: H = H(3/4, 1/4) + 3/4 H(a) + 1/4 H(b).
    other = types.SimpleNamespace(tokens=lambda: np.full(10, 4095, np.uint16))
    mixed = types.SimpleNamespace(
        train_streams={"a": stream, "b": other}, mixture_weights={"a": 3.0, "b": 1.0}, sp=sp
    )
    want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + 0.75 * expected
    assert tasks.LMTask.unigram_entropy(mixed) == pytest.approx(want, rel=1e-9)
