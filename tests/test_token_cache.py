"""Tokenized splits on disk (lrulm.data.cache): what a cached stream holds, when it is made
again, its dtype, and the byte accounting of bits per byte."""

import json

import numpy as np
import pytest

from lrulm.data import cache as data_cache
from lrulm.data import tokenizer as tok

TEXTS = [f"def f{i}(x):\n    return x * {i} + café\n" for i in range(120)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two of lrulm's own tokenizers of the same text, of different vocabulary sizes:
    {vocab size: (path, tokenizer)}."""
    d = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for size in (300, 420):
        path = str(d / f"sp{size}.model")
        out[size] = (path, tok.train_tokenizer(iter(TEXTS), path, vocab_size=size))
    return out


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _stream(sp, texts):
    """What a split of these documents must hold: each one's tokens, then EOS."""
    return [t for text in texts for t in (*sp.encode(text), tok.EOS_ID)]


def test_another_tokenizer_tokenizes_the_split_again(tokenizers, tmp_path, monkeypatch):
    """The cache entry is keyed by the tokenizer too: a run with another tokenizer of the
    same files must not read the first one's ids."""
    files = [_jsonl(tmp_path / "t.jsonl", TEXTS[:30])]
    cache_dir = str(tmp_path / "cache")
    (path1, sp1), (path2, sp2) = tokenizers[300], tokenizers[420]
    first = data_cache.prepare_split(files, sp1, path1, cache_dir, "train")
    assert first.tokens().tolist() == _stream(sp1, TEXTS[:30])
    second = data_cache.prepare_split(files, sp2, path2, cache_dir, "train")
    assert second.tokens().tolist() == _stream(sp2, TEXTS[:30]) != _stream(sp1, TEXTS[:30])
    assert second.num_tokens == len(_stream(sp2, TEXTS[:30])) != first.num_tokens
    assert data_cache.content_name(files, path1, "train") != data_cache.content_name(
        files, path2, "train"
    )
    # The same tokenizer again: read back from the cache, not tokenized anew.
    monkeypatch.setattr(data_cache, "tokenize_files", lambda *a, **k: pytest.fail("again"))
    again = data_cache.prepare_split(files, sp2, path2, cache_dir, "train")
    assert again == second


def test_every_document_of_a_file_is_tokenized_once_in_order(tokenizers, tmp_path):
    """300 documents: more than one batch of the tokenizer (256), each document's tokens
    then its EOS, none lost at a batch's end nor repeated."""
    _, sp = tokenizers[300]
    texts = [f"x{i} = {i * 7}" for i in range(300)]
    out = str(tmp_path / "t.npy")
    meta = data_cache.tokenize_files([_jsonl(tmp_path / "t.jsonl", texts)], sp, out)
    tokens = np.load(out)
    assert meta["num_docs"] == 300 and int(np.sum(tokens == tok.EOS_ID)) == 300
    assert tokens.tolist() == _stream(sp, texts)
    assert meta["num_tokens"] == tokens.size
    assert meta["num_bytes"] == sum(len(t.encode()) for t in texts)


def test_control_and_unknown_pieces_decode_to_no_bytes(tokenizers):
    """pad, unk, bos and eos stand for no text; byte pieces are one byte; a piece with
    ▁ counts it as the one space it decodes to."""
    _, sp = tokenizers[420]
    table = data_cache.piece_bytes(sp)
    specials = [tok.PAD_ID, tok.UNK_ID, tok.BOS_ID, tok.EOS_ID]
    assert table[specials].tolist() == [0, 0, 0, 0]
    assert all(table[i] == 1 for i in range(sp.get_piece_size()) if sp.is_byte(i))
    for i in range(sp.get_piece_size()):
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)):
            assert table[i] == len(sp.decode([i]).encode()), sp.id_to_piece(i)


def test_a_table_counts_a_split_exactly_only_if_its_bytes_add_up(tokenizers, tmp_path):
    """lrulm's own tokenizer decodes piece by piece, so its table counts a split's bytes
    exactly; a table one byte off per piece, or a split of one byte more, does not."""
    path, sp = tokenizers[420]
    files = [_jsonl(tmp_path / "t.jsonl", TEXTS[:20])]
    stream = data_cache.prepare_split(files, sp, path, str(tmp_path / "c"), "eval")
    table = data_cache.piece_bytes(sp)
    assert data_cache.counts_bytes_exactly(table, stream) is True
    assert data_cache.counts_bytes_exactly(table + 1, stream) is False
    off = data_cache.TokenStream(stream.path, stream.num_tokens, stream.num_bytes + 1, 20)
    assert data_cache.counts_bytes_exactly(table, off) is False
    assert data_cache.counts_bytes_exactly(table[:5], stream) is False  # ids it lacks


class _LargeVocabulary:
    """A tokenizer of 70,000 pieces (past uint16) whose documents encode to [65541, 7]."""

    def get_piece_size(self):
        return 70_000

    def encode(self, texts, num_threads=1):
        return [[65541, 7] for _ in texts]


def test_a_vocabulary_past_uint16_is_saved_as_uint32(tmp_path):
    out = str(tmp_path / "t.npy")
    meta = data_cache.tokenize_files(
        [_jsonl(tmp_path / "t.jsonl", ["a", "b"])], _LargeVocabulary(), out
    )
    tokens = np.load(out)
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [65541, 7, tok.EOS_ID] * 2 and meta["num_docs"] == 2


def test_the_state_of_an_entrys_sources(tmp_path):
    """No record (None, or an empty list from an entry made before sources were kept):
    "unknown"; else "current", "changed" once a file is edited, "gone" once deleted."""
    assert data_cache.sources_state(None) == "unknown"
    assert data_cache.sources_state([]) == "unknown"
    path = tmp_path / "t.jsonl"
    path.write_text("{}\n")
    record = data_cache.sources_record([str(path)])
    assert data_cache.sources_state(record) == "current"
    path.write_text('{"text": "more"}\n')
    assert data_cache.sources_state(record) == "changed"
    path.unlink()
    assert data_cache.sources_state(record) == "gone"
    assert data_cache.sources_state([["/no/such/dir/t.jsonl", 1, 1]]) == "unknown"
