"""Reading text documents: plain text files (one document each) and JSON lines (one
{"text": ...} object per line; data.text_field names another field), gzip-compressed or
not, strictly UTF-8, with errors that name the file, the line and the fix."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence

TEXT_FIELD = "text"


def is_packed(files: Sequence[str]) -> bool:
    """Whether files are ArrayRecord shards of tools/prepare_data.py (else text)."""
    return bool(files) and all(f.lower().endswith(".arrayrecord") for f in files)


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# JSON lines, by suffix (any case; before a .gz): one {"text": ...} object per line.
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonlines")


def _is_json_lines(path: str) -> bool:
    name = path.lower().removesuffix(".gz")
    return name.endswith(JSON_SUFFIXES)


def _open_bytes(path: str):
    """The file's bytes, decompressed for .gz (gzip's own magic number, whatever the name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if path.lower().endswith(".arrayrecord"):
        raise ValueError(
            f"{path} is ArrayRecord (packed by tools/prepare_data.py), not text: give "
            "ArrayRecord files as data.train_files/eval_files with the data.tokenizer they "
            "were prepared with"
        )
    return open(path, "rb")


def _not_utf8(path: str, e: UnicodeDecodeError, lineno: int | None = None) -> ValueError:
    where = f"{path}:{lineno}" if lineno else path
    return ValueError(
        f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. "
        f"iconv -f latin1 -t utf-8 {path}"
    )


def _one_json_document(path: str, first: str) -> ValueError:
    """A JSON array, or one object over several lines, where JSON lines were expected:
    the jq command that converts it, into a file of another name."""
    gz = path.lower().endswith(".gz")
    base = path[:-3] if gz else path
    base = base[: -len(next(s for s in JSON_SUFFIXES if base.lower().endswith(s)))]
    out = f"{base}.jsonl" if f"{base}.jsonl" != path else f"{base}.lines.jsonl"
    what, select = ("a JSON array", ".[]") if first == "[" else ("one JSON object", ".")
    read = f"gunzip -c {path} | jq -c '{select}'" if gz else f"jq -c '{select}' {path}"
    return ValueError(
        f"{path} holds {what}; JSON lines are one object per line: convert it, e.g. {read} > {out}"
    )


def _json_type(value) -> str:
    """A parsed JSON value's type as JSON names it ("a number", "null", "an array")."""
    for kind, name in ((bool, "a boolean"), ((int, float), "a number"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return "an object" if isinstance(value, dict) else "null"


def read_documents(path: str, field: str = TEXT_FIELD) -> Iterator[str]:
    """Documents in a file: each JSON line's `field` ("text"; data.text_field) for
    .jsonl/.json/.ndjson/.jsonlines (any case), else the whole file as one document;
    gzip-compressed files are read through (`.gz`). A UTF-8 byte-order mark at the start
    is not text. Empty texts are left out."""
    return (text for _, text in read_records(path, field) if text)


def check_text_field(field, what: str = "data.text_field") -> None:
    """Raises ValueError unless `field` names a JSON field (a non-empty string)."""
    if not isinstance(field, str) or not field.strip():
        raise ValueError(
            f"{what} names the JSON lines' field that holds the text, e.g. 'text' or "
            f"'content'; got {field!r}"
        )


def read_records(path: str, field: str = TEXT_FIELD) -> Iterator[tuple[int, str]]:
    """(line, text) of each record of a file as `read_documents` reads them, empty texts
    included (blank lines of JSON lines are no records); a plain text file is line 1."""
    if _is_json_lines(path):
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, e, lineno) from None
                if not line.strip():
                    continue
                if lineno == 1 and (line.lstrip().startswith("[") or line.strip() == "{"):
                    raise _one_json_document(path, line.lstrip()[0])
                try:
                    record = json.loads(line)
                    text = record[field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    has = ""
                    if isinstance(e, KeyError) and isinstance(record, dict):
                        has = f"; its fields: {', '.join(map(str, list(record)[:8]))}"
                        has += " (data.text_field / --text_field names the one to read)"
                    raise ValueError(
                        f"{path}:{lineno}: expected a JSON object with a {field!r} string "
                        f"field per line ({type(e).__name__}: {e}){has}"
                    ) from None
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{lineno}: the {field!r} field is {_json_type(text)}, not a string"
                    )
                if not text.isascii() and not _encodes(text):  # a lone surrogate, "\ud800"
                    raise ValueError(
                        f"{path}:{lineno}: the {field!r} field is not valid Unicode "
                        "(a lone surrogate escape)"
                    )
                yield lineno, text
        return
    # Strict, as for JSON lines: replacing bad bytes would train on U+FFFD unseen. Line
    # ends are kept as they are, as JSON lines keep theirs.
    with _open_bytes(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    yield 1, text
