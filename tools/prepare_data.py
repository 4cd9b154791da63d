"""Tokenizes and packs a large corpus once into ArrayRecord shards for random access.

    python tools/prepare_data.py --input 'corpus/train-*.jsonl' --tokenizer tok.model \\
        --seq_len 2048 --output data/train --num_shards 64
    python tools/prepare_data.py --input 'corpus/eval-*.jsonl' --tokenizer tok.model \\
        --seq_len 2048 --output data/eval --num_shards 4

Each record is one packed sequence of seq_len + 1 uint32 tokens (inputs and targets
shifted by one), exactly the windows `lrulm train` cuts from a token stream, documents
separated by EOS; the last, partial window is filled up with PAD (not scored). Then train
from them without tokenizing again:

    lrulm train ... --config.data.train_files='data/train-*.arrayrecord' \\
        --config.data.eval_files='data/eval-*.arrayrecord' --config.data.tokenizer=tok.model

Records are assigned to shards round-robin, so any process reads any record directly
(Grain's ArrayRecordDataSource), and each process reads only its share. `OUTPUT.meta.json`
beside them holds the token and byte counts (eval/bits_per_byte of an eval set).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np
import tool_args
from array_record.python.array_record_module import ArrayRecordWriter

from lrulm.data import documents
from lrulm.data import lm as lm_data
from lrulm.data import tokenizer as tok


def _prefix(path: str) -> str | None:
    m = lm_data.SHARD_NAME.match(path)
    return m["prefix"] if m else None


def write_shards(texts, sp, *, seq_len: int, output: str, num_shards: int) -> dict:
    """Packs the documents' tokens (EOS after each) into windows of seq_len + 1 and writes
    them round-robin to num_shards ArrayRecord files `output-XXXXX-of-NNNNN.arrayrecord`."""
    if seq_len < 1:
        raise ValueError(f"--seq_len must be positive; got {seq_len}")
    if num_shards < 1:
        raise ValueError(f"--num_shards must be positive; got {num_shards}")
    if os.path.isdir(output) or output.endswith(os.sep):
        raise ValueError(
            f"--output is a path prefix, not a directory: e.g. {os.path.join(output, 'train')} "
            "writes train-00000-of-NNNNN.arrayrecord there"
        )
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    paths = [f"{output}-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    # Written under temporary names, renamed when complete: an interrupted run leaves the
    # previous shards as they were, and a glob never finds half a set.
    partial = [f"{p}.partial" for p in paths]
    writers = [ArrayRecordWriter(p, "group_size:1") for p in partial]
    buffer = np.zeros((0,), np.uint32)
    count = num_tokens = num_bytes = 0
    done = False
    try:
        for text in texts:
            ids = np.asarray(sp.encode(text) + [tok.EOS_ID], np.uint32)
            num_tokens += ids.size
            num_bytes += len(text.encode("utf-8"))
            buffer = np.concatenate([buffer, ids])
            # Windows overlap by one token: targets of one are inputs of the next.
            while buffer.size >= seq_len + 1:
                writers[count % num_shards].write(buffer[: seq_len + 1].tobytes())
                buffer = buffer[seq_len:]
                count += 1
        if count and buffer.size > 1:
            # The last, partial window, PAD after it (weight 0 in the loss): a full
            # evaluation pass then scores every token, as on the text path.
            tail = np.full((seq_len + 1,), tok.PAD_ID, np.uint32)
            tail[: buffer.size] = buffer
            writers[count % num_shards].write(tail.tobytes())
            count += 1
        done = True
    finally:
        for w in writers:
            w.close()
        if not done or count == 0:  # leave no partial or empty shards for a glob to find
            for path in partial:
                if os.path.exists(path):
                    os.remove(path)
    if count == 0:
        raise ValueError(
            f"the corpus has {num_tokens} tokens, fewer than one sequence of "
            f"{seq_len} + 1; use a shorter --seq_len or more data"
        )
    # An earlier run's shards of this prefix (another shard count) would be read too by
    # the glob that names these: they go.
    candidates = glob.glob(f"{glob.escape(output)}-*-of-*.arrayrecord")
    older = {p for p in candidates if _prefix(p) == output} - set(paths)
    for path in sorted(older):
        os.remove(path)
    for tmp, path in zip(partial, paths):
        os.replace(tmp, path)
    # Beside the shards: the text's bytes per token, for eval/bits_per_byte.
    meta = {"tokens": num_tokens, "bytes": num_bytes, "sequences": count, "seq_len": seq_len}
    meta["tokenizer_sha256"] = lm_data.tokenizer_digest(sp)  # what a run checks it has
    with open(lm_data.shards_meta_path(output) + ".tmp", "w") as f:
        json.dump({**meta, "num_shards": num_shards}, f)
    os.replace(lm_data.shards_meta_path(output) + ".tmp", lm_data.shards_meta_path(output))
    return {
        "sequences": count,
        "tokens": num_tokens,
        "files": paths,
        "meta": lm_data.shards_meta_path(output),
        "removed": sorted(older),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="globs of text / JSON-lines files")
    p.add_argument("--tokenizer", required=True, help="a sentencepiece .model")
    p.add_argument("--seq_len", type=int, required=True)
    p.add_argument("--output", required=True, help="path prefix of the shards")
    p.add_argument("--num_shards", type=int, default=8)
    p.add_argument("--text_field", default="text", help="JSON lines: the field that holds the text")
    args = tool_args.show_defaults(p).parse_args()
    try:
        model, renumbered = tok.model_bytes(args.tokenizer)
        sp = tok.from_model_bytes(model, args.tokenizer)
        if renumbered:  # the ids written are lrulm's, as a run with this tokenizer reads them
            print(f"prepare_data: {renumbered}", file=sys.stderr)
        files = lm_data.expand_globs(args.input, "--input")
        documents.check_text_field(args.text_field, "--text_field")
        texts = (d for f in files for d in documents.read_documents(f, args.text_field))
        info = write_shards(
            texts, sp, seq_len=args.seq_len, output=args.output, num_shards=args.num_shards
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        sys.exit(2)
    if info["removed"]:
        print(f"removed {len(info['removed'])} shards of an earlier run: {info['removed'][0]}, ...")
    print(
        f"wrote {info['sequences']} sequences of {args.seq_len} + 1 tokens "
        f"({info['tokens']} tokens) to {len(info['files'])} shards {args.output}-*"
    )


if __name__ == "__main__":
    main()
