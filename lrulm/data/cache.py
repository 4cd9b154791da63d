"""Tokenized splits on disk: a text split tokenized once into a flat stream (each document
followed by EOS) saved as .npy beside a JSON record of what it was made from (a fingerprint of
the files and the tokenizer, the files themselves for `tools/cache_dir.py`), reused while
both are unchanged; and the byte accounting of such streams (bits per byte)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lrulm.data import tokenizer as tok
from lrulm.data.documents import TEXT_FIELD, read_documents

log = logging.getLogger(__name__)


def _hash_files(h, files: Sequence[str]):
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h


def sources_record(files: Sequence[str]) -> list[list]:
    """[absolute path, size, mtime_ns] of each file a cache entry was made from (kept in the
    entry, so `tools/cache_dir.py` can tell entries of edited or deleted files)."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def sources_state(record: list | None) -> str:
    """ "current" (every file as recorded), "changed", "gone" (a file deleted), or
    "unknown" (an entry made before its sources were recorded)."""
    if not record:
        return "unknown"
    state = "current"
    try:
        for path, size, mtime in record:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                # Its directory is there, the file not; else the corpus may not be mounted.
                return "gone" if os.path.isdir(os.path.dirname(path)) else "unknown"
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                state = "changed"
    except (OSError, TypeError, ValueError):  # unreadable (not mounted here?) or malformed
        return "unknown"
    return state


def write_json_atomic(path: str, obj) -> None:
    """obj as JSON at path, whole or not at all; the temporary file has a name of its own,
    so runs sharing a data.cache_dir never write one file."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def touch(path: str) -> None:
    """Marks a cache entry used now (its file's mtime; `tools/cache_dir.py --unused_days`)."""
    with contextlib.suppress(OSError):  # a read-only cache is still read
        os.utime(path)


def _fingerprint(files: Sequence[str], tokenizer_path: str, field: str = TEXT_FIELD) -> str:
    h = _hash_files(hashlib.sha256(), files)  # as before: caches made earlier stay valid
    with open(tokenizer_path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    if field != TEXT_FIELD:  # another JSON field is other text (the default: as before)
        h.update(f"field={field}".encode())
    return h.hexdigest()


def tokenize_files(files: Sequence[str], sp, out_path: str, field: str = TEXT_FIELD) -> dict:
    """Tokenizes the files into one stream (EOS after each document) saved at out_path.

    Returns metadata: token and byte counts (bits per byte needs bytes per token).
    """
    dtype = np.uint16 if sp.get_piece_size() <= 2**16 else np.uint32
    chunks, num_bytes, num_docs = [], 0, 0
    batch: list[str] = []

    def flush():
        for ids in sp.encode(batch, num_threads=os.cpu_count() or 1):
            chunks.append(np.asarray(ids + [tok.EOS_ID], dtype))
        batch.clear()

    for path in files:
        for doc in read_documents(path, field):
            batch.append(doc)
            num_bytes += len(doc.encode("utf-8"))
            num_docs += 1
            if len(batch) >= 256:
                flush()
    flush()
    tokens = np.concatenate(chunks) if chunks else np.zeros((0,), dtype)
    tmp = f"{out_path}.{uuid.uuid4().hex[:8]}.tmp.npy"  # its own: runs may share a cache
    np.save(tmp, tokens)
    os.replace(tmp, out_path)
    return dict(num_tokens=int(tokens.size), num_bytes=num_bytes, num_docs=num_docs)


@dataclass
class TokenStream:
    """A tokenized split on disk."""

    path: str
    num_tokens: int
    num_bytes: int
    num_docs: int

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / max(self.num_tokens, 1)

    def tokens(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def files_fingerprint(files: Sequence[str]) -> str:
    """A digest of the files' absolute paths, sizes and modification times."""
    return _hash_files(hashlib.sha256(), files).hexdigest()


def content_name(files, tokenizer_path, name, field: str = TEXT_FIELD) -> str:
    """`name-<digest>` of the files (paths, sizes, times), the tokenizer's bytes and the
    JSON field read."""
    return f"{name}-{_fingerprint(files, tokenizer_path, field)[:16]}"


def cache_name(files, tokenizer_path, cache_dir, name, field: str = TEXT_FIELD) -> str:
    """`name` where cache_dir's `name` holds these files' tokens, else `name-<digest>`:
    an evaluation on other text leaves the run's own cached split as it is."""
    fp = _fingerprint(files, tokenizer_path, field)
    try:
        with open(os.path.join(cache_dir, f"{name}.meta.json")) as f:
            cached = json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        cached = None
    return name if cached == fp else content_name(files, tokenizer_path, name, field)


def prepare_split(
    files, sp, tokenizer_path, cache_dir, name, *, shared=False, field: str = TEXT_FIELD
) -> TokenStream:
    """Tokenizes a split (JSON lines: their `field`) into cache_dir unless an up-to-date
    copy is there (in a `shared` cache, data.cache_dir, a copy read is marked used:
    `tools/cache_dir.py`)."""
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"{name}.tokens.npy")
    meta_path = os.path.join(cache_dir, f"{name}.meta.json")
    fp = _fingerprint(files, tokenizer_path, field)
    if os.path.exists(meta_path) and os.path.exists(out):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("fingerprint") == fp:
            if shared:
                touch(meta_path)
            return TokenStream(out, meta["num_tokens"], meta["num_bytes"], meta["num_docs"])
    log.info("tokenizing %d %s files into %s", len(files), name, out)
    meta = tokenize_files(files, sp, out, field)
    meta.update(fingerprint=fp, files=len(files), sources=sources_record(files))
    write_json_atomic(meta_path, meta)
    return TokenStream(out, meta["num_tokens"], meta["num_bytes"], meta["num_docs"])


# -- bytes -----------------------------------------------------------------------------------


def piece_bytes(sp) -> np.ndarray:
    """The UTF-8 bytes each piece of a tokenizer decodes to, when decoding is the
    concatenation of pieces (as for lrulm's own: no dummy prefix, no normalisation):
    control and unknown pieces 0, byte pieces 1, others their text (▁ a space)."""
    out = np.zeros(sp.get_piece_size(), np.int32)
    for i in range(sp.get_piece_size()):
        if sp.is_byte(i):
            out[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


COUNT_SLICE = 1 << 24  # tokens counted at once by token_counts


def token_counts(stream: TokenStream) -> np.ndarray:
    """How often each token id occurs in a tokenized split (counted a slice at a time:
    the tokens stay on disk, not copied whole as int64)."""
    tokens = stream.tokens()
    counts = np.zeros(1, np.int64)
    for start in range(0, len(tokens), COUNT_SLICE):
        part = np.bincount(np.asarray(tokens[start : start + COUNT_SLICE]))
        if len(part) > len(counts):
            counts = np.pad(counts, (0, len(part) - len(counts)))
        counts[: len(part)] += part
    return counts


def counts_bytes_exactly(table: np.ndarray, stream: TokenStream) -> bool:
    """Whether the piece table's bytes of every token of a tokenized split add up to the
    split's own UTF-8 bytes (then any slice of it is counted exactly)."""
    counts = token_counts(stream)
    if len(counts) > len(table):
        return False  # ids the table does not have: another tokenizer's tokens
    return int(counts @ table[: len(counts)].astype(np.int64)) == stream.num_bytes
