"""Public SentencePiece models number their special pieces their own way (Llama: unk 0,
bos 1, eos 2, no pad; Gemma: pad 0, eos 1, bos 2, unk 3): lrulm reads them with pad, unk,
bos and eos at 0-3 (added where missing) and segments text exactly as they do."""

import os

import pytest
import sentencepiece as spm
from run_helpers import tiny_config

from lrulm import train
from lrulm.data import lm as lm_data
from lrulm.data import tokenizer as tok

TEXT = 'class A:\n    def f(self, x):\n        return x  # 42 ünï\n\n\tif x:\n  print("é")\n'


def _stock(tmp_path, corpus, name, **ids):
    """A SentencePiece model trained with SentencePiece's own defaults (and `ids`)."""
    prefix = str(tmp_path / name)
    spm.SentencePieceTrainer.train(
        input=corpus["train"], model_prefix=prefix, vocab_size=600, byte_fallback=True,
        minloglevel=2, **ids,
    )  # fmt: skip
    return prefix + ".model"


def _specials(sp):
    return sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()


@pytest.mark.parametrize(
    "name, ids, was, added",
    [
        ("llama", {}, (-1, 0, 1, 2), ["<pad>"]),  # SentencePiece's defaults: no pad
        ("bpe", dict(model_type="bpe"), (-1, 0, 1, 2), ["<pad>"]),
        ("gemma", dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3), (0, 3, 2, 1), []),
        # "<pad>" an ordinary piece: the pad added takes another name
        ("taken", dict(user_defined_symbols=["<pad>"]), (-1, 0, 1, 2), ["<lrulm_pad>"]),
    ],
)
def test_other_numberings_are_read_renumbered(tmp_path, corpus, name, ids, was, added):
    path = _stock(tmp_path, corpus, name, **ids)
    original = spm.SentencePieceProcessor(model_file=path)
    assert _specials(original) == was
    model, note = tok.model_bytes(path)
    assert f"numbers pad, unk, bos, eos as {', '.join(map(str, was))}" in note
    assert (f"added {', '.join(added)}" in note) == bool(added)
    sp = tok.load_tokenizer(path)
    assert _specials(sp) == (0, 1, 2, 3)
    assert sp.get_piece_size() == original.get_piece_size() + len(added)
    assert [sp.id_to_piece(i) for i in range(4)] == [
        original.id_to_piece(i) if i >= 0 else added[0] for i in was
    ]
    assert all(sp.is_control(i) for i in (0, 2, 3)) and sp.is_unknown(1)
    for text in (TEXT, open(corpus["eval"]).read()[:20000]):
        assert sp.encode(text, out_type=str) == original.encode(text, out_type=str)
        assert sp.decode(sp.encode(text)) == original.decode(original.encode(text))
    if name == "taken":  # the ordinary "<pad>" still encodes as itself, not as padding
        assert sp.piece_to_id("<pad>") in sp.encode("<pad>") and sp.piece_to_id("<pad>") > 3
    # lrulm's own numbering is read as it is, byte for byte
    again, note = tok.renumbered(model, path)
    assert again == model and note == ""


def test_a_file_that_is_no_sentencepiece_model_is_named(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tok.model is not a SentencePiece model"):
        tok.load_tokenizer(str(bad))
    with pytest.raises(ValueError, match="is a directory; give its .model file"):
        tok.load_tokenizer(str(tmp_path))


def test_a_run_with_a_public_tokenizer(tmp_path, corpus, capsys):
    """data.tokenizer numbered otherwise: the workdir keeps it renumbered (said once), a
    resume naming the same file is the same tokenizer, and ArrayRecord shards prepared
    with the file record the digest the run checks."""
    path = _stock(tmp_path, corpus, "llama")
    workdir = str(tmp_path / "run")
    common = [f"data.tokenizer={path}", "checkpoint.async_save=false", "train.eval_every=0"]
    train.train_and_evaluate(tiny_config("train.steps=2", *common, corpus=corpus), workdir)
    assert "holds it so renumbered" in capsys.readouterr().out
    own = tok.load_tokenizer(os.path.join(workdir, "tokenizer.model"))
    assert _specials(own) == (0, 1, 2, 3) and own.id_to_piece(0) == "<pad>"
    assert open(os.path.join(workdir, "tokenizer.model"), "rb").read() == tok.model_bytes(path)[0]
    train.train_and_evaluate(tiny_config("train.steps=4", *common, corpus=corpus), workdir)
    assert "renumbered" not in capsys.readouterr().out  # the same tokenizer: resumed
    digest = lm_data.tokenizer_digest
    assert digest(tok.load_tokenizer(path)) == digest(own)


def test_a_model_whose_pad_is_its_eos_gets_a_pad_of_its_own(tmp_path, corpus):
    """pad = eos (some models' training setup): padding must weigh 0 while document ends
    are targets, so a pad piece is added; one without bos or eos gets those too."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(open(_stock(tmp_path, corpus, "base"), "rb").read())
    proto.trainer_spec.pad_piece = proto.trainer_spec.eos_piece  # pad = eos = "</s>"
    model, note = tok.renumbered(proto.SerializeToString(), "padeos")
    sp = tok.from_model_bytes(model)
    assert _specials(sp) == (0, 1, 2, 3) and sp.id_to_piece(3) == "</s>"
    assert sp.id_to_piece(0) == "<pad>" and "added <pad>;" in note and sp.is_control(0)
    del proto.pieces[1:3]  # no <s>, no </s>
    proto.trainer_spec.pad_piece = "<pad>"
    model, note = tok.renumbered(proto.SerializeToString(), "bare")
    sp = tok.from_model_bytes(model)
    assert _specials(sp) == (0, 1, 2, 3) and "added <pad>, <s>, </s>" in note
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
