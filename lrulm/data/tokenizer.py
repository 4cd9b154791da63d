"""SentencePiece tokenizers: training one on a corpus, loading one, and the ids lrulm uses.

Ids 0-3 are reserved: 0 pad, 1 unk, 2 bos, 3 eos; another SentencePiece model (Llama's,
Gemma's, T5's: their own numbering) is read with those four pieces moved there (added
where it has none), every other piece in its order after them: the same segmentation,
other ids (`renumbered`). The models lrulm trains are made for source
code and prose alike: identity normalisation, whitespace kept as it is (indentation
matters in Python), byte fallback so that any character can be encoded, digits split.
Every string round-trips except for U+2581 ("▁"), SentencePiece's own escape for a
space, which decodes as a space.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Iterable, Iterator

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# SentencePiece skips, without a word, every training sentence longer than its
# max_sentence_length (4192 bytes by default): long lines (a paragraph per line, minified
# code, JSON) are cut into pieces of at most this many bytes instead, and the limit
# passed is 4x that, room for whitespace escaped to the 3-byte U+2581.
_MAX_LINE_BYTES = 4096

# Pieces every model has besides the corpus's characters: pad, unk, bos, eos, "\n" (a
# user-defined symbol) and the 256 byte-fallback pieces; and the smallest vocabulary
# asked for, so that a few merges fit beside them.
_BASE_PIECES = 4 + 1 + 256
_MIN_VOCAB = 300


def _split_long(line: str, limit: int = _MAX_LINE_BYTES) -> Iterator[str]:
    """The line in pieces of at most `limit` UTF-8 bytes, cut after whitespace where
    there is some in the second half of a piece, and never inside a character."""
    if len(line) <= limit // 4:  # at most 4 bytes a character: short enough
        yield line
        return
    data = line.encode("utf-8")
    start = 0  # an offset, not a slice of the rest: linear in the line's length
    while len(data) - start > limit:
        cut = start + limit
        while data[cut] & 0xC0 == 0x80:  # a continuation byte: back to the character start
            cut -= 1
        space = max(data.rfind(b" ", start, cut), data.rfind(b"\t", start, cut))
        if space >= start + limit // 2:
            cut = space + 1
        yield data[start:cut].decode("utf-8")
        start = cut
    if start < len(data):
        yield data[start:].decode("utf-8")


def _lines(texts: Iterable[str], max_lines: int, seed: int) -> Iterator[str]:
    """Non-blank lines of the texts (long ones in pieces), a seeded reservoir sample if
    there are too many."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in (p for whole in text.split("\n") for p in _split_long(whole)):
            if not line.strip():
                continue
            seen += 1
            if len(sample) < max_lines:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    sample[j] = line
    yield from sample


def train_tokenizer(
    texts: Iterable[str],
    output_path: str,
    *,
    vocab_size: int = 2048,
    model_type: str = "bpe",
    max_lines: int = 300_000,
    seed: int = 0,
) -> spm.SentencePieceProcessor:
    """Trains a SentencePiece model on the texts and writes it to output_path.

    Lines are the training sentences; the dummy word-start prefix is off so that a word
    at the start of a line tokenizes the same way inside a whole document as in
    training. Newlines are a user-defined symbol: one token each.
    """
    if os.path.isdir(output_path) or output_path.endswith(os.sep):
        raise ValueError(
            f"the tokenizer output {output_path} is a directory; give a file path, e.g. "
            f"{os.path.join(output_path, 'tokenizer.model')}"
        )
    model = io.BytesIO()
    lines = list(_lines(texts, max_lines, seed))
    if not lines:
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-blank lines)")
    chars = set()
    for line in lines:
        chars.update(line)
    if " " in chars:  # SentencePiece escapes a space as U+2581: one piece for both
        chars.discard(" ")
        chars.add("\u2581")
    needed = _BASE_PIECES + len(chars)
    if vocab_size < max(_MIN_VOCAB, needed):
        why = (
            f" for this corpus: its {len(chars)} distinct characters and the "
            f"{_BASE_PIECES} byte and control pieces need {needed}"
            if needed > _MIN_VOCAB
            else f": the {_BASE_PIECES} byte and control pieces leave too few for merges"
        )
        raise ValueError(
            f"vocab_size {vocab_size} is too small{why}; use at least "
            f"{max(_MIN_VOCAB, needed)} (--config.data.vocab_size, or `lrulm tokenizer "
            "train --vocab_size`)"
        )
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=False,
            split_digits=True,
            max_sentence_length=4 * _MAX_LINE_BYTES,
            user_defined_symbols=["\n"],
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            hard_vocab_limit=False,  # small corpora: take what there is rather than fail
            num_threads=max(1, min(8, os.cpu_count() or 1)),
            shuffle_input_sentence=False,  # the sample above is already seeded
            minloglevel=2,
        )
    except RuntimeError as e:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed is None:
            raise
        raise ValueError(
            f"vocab_size {vocab_size} is too small for this corpus: its distinct characters "
            f"and the byte and control pieces need {needed.group(1)}; use at least that "
            "(--config.data.vocab_size, or `lrulm tokenizer train --vocab_size`)"
        ) from None
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = output_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, output_path)  # atomic: a half-written tokenizer is never picked up
    return load_tokenizer(output_path)


def _special_ids(sp: spm.SentencePieceProcessor) -> tuple[int, int, int, int]:
    return sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()


def from_model_bytes(model: bytes, path: str = "the tokenizer") -> spm.SentencePieceProcessor:
    """A SentencePiece model read from its bytes (`path` names it in errors)."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a SentencePiece model: {e}") from None
    return sp


# Texts whose segmentation a renumbered model must keep, piece for piece.
_CHECK_TEXTS = (
    "def f(x):\n    return x + 1  # one\n\n",
    "The quick brown fox, 12345 times.\tTabs  and   spaces\r\n",
    "日本語 and ünïcödé — ✓ <s> </s> <pad> <unk>",
)


def renumbered(model: bytes, path: str = "the tokenizer") -> tuple[bytes, str]:
    """A SentencePiece model (serialized) with its pad, unk, bos and eos pieces at lrulm's
    ids 0-3 and every other piece after them in its order, and a note saying what moved
    (`model` itself and "" where it numbers them so already).

    The data, the loss (PAD weighs 0), document resets (at EOS) and generation (stops at
    EOS, never draws PAD) use those ids. A special the model lacks (Llama's has no pad) is
    added as a control piece. Segmentation is by the pieces' scores, not their ids: the
    same texts give the same pieces (checked)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    old = from_model_bytes(model, path)
    ids = _special_ids(old)
    if ids == (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        return model, ""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    spec, pieces = proto.trainer_spec, list(proto.pieces)
    taken = {p.piece for p in pieces}
    roles = ("pad", "unk", "bos", "eos")
    # A piece two roles share (pad = eos in some models) keeps the other role; padding
    # (weighed 0) gets a piece of its own.
    own, moved = {}, set()
    for role in ("unk", "eos", "bos", "pad"):
        i = ids[roles.index(role)]
        if i >= 0 and i not in moved:
            own[role] = i
            moved.add(i)
    front, added = [], []
    for role in roles:
        if role in own:
            front.append(pieces[own[role]])
            continue
        # Its own name, else the usual one, else one no piece has (the name is taken by
        # the piece pad shared, or by an ordinary piece).
        names = [getattr(spec, f"{role}_piece"), f"<{role}>", f"<lrulm_{role}>"]
        name = next((n for n in names if n and n not in taken), None)
        while name is None or name in taken:
            name = (name or names[-1])[:-1] + "_>"
        taken.add(name)
        setattr(spec, f"{role}_piece", name)
        control = model_pb2.ModelProto.SentencePiece.CONTROL  # (every model has an unk)
        front.append(model_pb2.ModelProto.SentencePiece(piece=name, score=0.0, type=control))
        added.append(name)
    del proto.pieces[:]
    proto.pieces.extend(front + [p for j, p in enumerate(pieces) if j not in moved])
    spec.pad_id, spec.unk_id, spec.bos_id, spec.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    out = proto.SerializeToString()
    new = from_model_bytes(out, path)
    same = all(old.encode(t, out_type=str) == new.encode(t, out_type=str) for t in _CHECK_TEXTS)
    if _special_ids(new) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID) or not same:
        raise ValueError(
            f"{path} numbers pad, unk, bos, eos as {', '.join(map(str, ids))}, and renumbering "
            f"them to {PAD_ID}-{EOS_ID} changed how it segments text; train one with `lrulm "
            "tokenizer train`, or SentencePiece with --pad_id=0 --unk_id=1 --bos_id=2 --eos_id=3"
        )
    note = (
        f"{path} numbers pad, unk, bos, eos as {', '.join(map(str, ids))}: read with them "
        f"at {PAD_ID}, {UNK_ID}, {BOS_ID}, {EOS_ID} and every other piece after them "
        f"({new.get_piece_size():,} pieces"
        + (f"; added {', '.join(added)}" if added else "")
        + "; the same segmentation, other ids)"
    )
    return out, note


def model_bytes(path: str) -> tuple[bytes, str]:
    """The SentencePiece model at path as lrulm numbers it, and a note where that is not
    as the file has it (`renumbered`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}; train one with `lrulm tokenizer train`")
    if os.path.isdir(path):
        raise ValueError(f"the tokenizer {path} is a directory; give its .model file")
    with open(path, "rb") as f:
        return renumbered(f.read(), path)


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    """Loads a SentencePiece model file, with a clear error if it is missing or bad; one
    that numbers pad, unk, bos and eos otherwise is read renumbered (`renumbered`)."""
    model, _ = model_bytes(path)
    return from_model_bytes(model, path)
