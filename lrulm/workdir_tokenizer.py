"""The tokenizer a language-model run trains with, kept in its workdir as tokenizer.model.

`prepare` makes it ready before the data is tokenized: `data.tokenizer` (or the
tokenizer of the run `checkpoint.init_from` starts from) copied in, else one trained on
the train files, shared through `data.cache_dir` by the runs of a sweep. Its embedding
rows are the checkpoints' token ids, so a workdir with checkpoints never has its
tokenizer replaced by another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid

import jax

from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import distributed
from lrulm import metrics as metrics_lib
from lrulm.data import cache as data_cache
from lrulm.data import documents
from lrulm.data import tokenizer as tok

log = logging.getLogger(__name__)

# A language model's parameters indexed by token id (model.LanguageModel's paths).
VOCAB_PARAMS = ("embed/embedding", "head/kernel")


def next_to(path: str) -> str:
    """The tokenizer.model of the run a checkpoint path (workdir, its checkpoints/ or one
    step) belongs to, or "" if there is none."""
    path = os.path.abspath(path)
    for _ in range(3):
        candidate = os.path.join(path, "tokenizer.model")
        if os.path.isfile(candidate):
            return candidate
        path = os.path.dirname(path)
    return ""


def check_same(given: str, own: str, workdir: str) -> None:
    """Refuses data.tokenizer where the workdir's checkpoints were trained with another
    tokenizer (their embedding rows are its ids), before anything is replaced. The given
    one is compared as lrulm reads it (renumbered, where it numbers its specials apart)."""
    if not os.path.exists(own) or not ckpt_lib.checkpoint_steps(workdir):
        return
    if tok.model_bytes(given)[0] == _read(own):
        return
    raise ValueError(
        f"data.tokenizer={given} is not {own}, the tokenizer this workdir's checkpoints "
        "were trained with (their embeddings are its ids); nothing was changed. Leave out "
        "data.tokenizer to resume or evaluate, or train with the new tokenizer in another "
        "--workdir"
    )


def _copy_atomic(src: str, dst: str, data: bytes | None = None) -> None:
    """src copied to dst (or `data` written there) whole or not at all (a crash mid-copy
    leaves dst as it was)."""
    tmp = f"{dst}.{uuid.uuid4().hex[:8]}.tmp"  # its own: runs sharing data.cache_dir race
    if data is None:
        shutil.copyfile(src, tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(data)
    os.replace(tmp, dst)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _field(config) -> str:
    return config.data.get("text_field", documents.TEXT_FIELD)


def _spec(config, train_files: list[str], relative_to: str | None = None) -> dict:
    """What the workdir's own tokenizer is trained from (kept beside it as
    tokenizer.json): the vocabulary asked for, the train files' names (as given, or
    relative to `relative_to`) and sizes, and the JSON field read where it is not "text"."""
    name = (lambda f: os.path.relpath(f, relative_to)) if relative_to else (lambda f: f)
    files = sorted((name(f), os.path.getsize(f)) for f in train_files)
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    spec = {"vocab_size": config.data.vocab_size, "files": len(files), "digest": digest}
    if _field(config) != documents.TEXT_FIELD:  # the default's record stays as it was
        spec["text_field"] = _field(config)
    return spec


def _stale(tok_path: str, spec_path: str, spec: dict, workdir: str, same=()) -> bool:
    """Whether the tokenizer an earlier run trained in this workdir was trained for
    another vocab_size or corpus (spec_path holds what it was; `same`: other specs of
    these files, e.g. named from where the run started) and no checkpoint's embeddings
    use it, so that it is trained again. With checkpoints it is kept, and the difference
    is said."""
    if not os.path.exists(spec_path):  # given by the user, or from before the record
        return False
    with open(spec_path) as f:
        old = json.load(f)
    if old in same:
        return False
    keys = list(spec) + [k for k in old if k not in spec]  # a key may come or go
    changed = [f"{k} {old.get(k)} -> {spec.get(k)}" for k in keys if old.get(k) != spec.get(k)]
    if not changed:
        return False
    if ckpt_lib.checkpoint_steps(workdir):
        metrics_lib.say(
            f"lrulm: keeping {tok_path}, which this run's checkpoints were trained with, "
            f"though it was made for other data ({', '.join(changed)})"
        )
        return False
    metrics_lib.say(
        f"lrulm: {tok_path} was made for other data ({', '.join(changed)}) and no "
        "checkpoint uses it: training a new one"
    )
    return True


def _shared(config, train_files: list[str]) -> str | None:
    """Where data.cache_dir keeps the tokenizer trained for these files (None: no cache)."""
    cache_dir = config.data.get("cache_dir", "")
    if not cache_dir:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    # Keyed by the files' sizes and times too: an edited corpus trains its own.
    digest = data_cache.files_fingerprint(train_files)
    if _field(config) != documents.TEXT_FIELD:
        digest = hashlib.sha256(f"{digest} field={_field(config)}".encode()).hexdigest()
    digest = digest[:16]
    return os.path.join(cache_dir, f"tokenizer-{config.data.vocab_size}-{digest}.model")


def _from_init_run(config, tok_path: str, main: bool) -> str:
    """The tokenizer of the run checkpoint.init_from starts from, where the parameters
    taken include rows indexed by token id (the embedding, an untied output head), not
    for a backbone alone; "" where none is needed (or none is there: said)."""
    init_from = config.checkpoint.get("init_from", "")
    select = [p.strip() for p in config.checkpoint.get("init_from_params", "").split(",")]
    select = [p for p in select if p]
    if not init_from or (select and not any(re.search(p, n) for p in select for n in VOCAB_PARAMS)):
        return ""
    # The parameters' embedding rows are that run's token ids: keep its tokenizer.
    tokenizer = next_to(init_from)
    if main and not tokenizer:
        metrics_lib.say(
            f"lrulm: warning: no tokenizer.model next to checkpoint.init_from="
            f"{init_from}; a new tokenizer's ids will not match its embeddings "
            "(set --config.data.tokenizer to the one it was trained with)"
        )
    elif main and not os.path.exists(tok_path):
        metrics_lib.say(f"lrulm: the tokenizer of checkpoint.init_from: {tokenizer}")
    return tokenizer


def _train(config, tok_path: str, train_files: list[str]) -> None:
    """A tokenizer trained on the train files into tok_path, or the one data.cache_dir
    keeps for them (a sweep trains it once)."""
    vocab_size = config.data.vocab_size
    shared = _shared(config, train_files)
    if shared and os.path.exists(shared):  # trained by another run already
        _copy_atomic(shared, tok_path)
        data_cache.touch(shared)
        metrics_lib.say(f"lrulm: the tokenizer from data.cache_dir: {shared}")
        return
    log.info("training a %d-piece tokenizer on %d files", vocab_size, len(train_files))
    docs = (d for f in train_files for d in documents.read_documents(f, _field(config)))
    tok.train_tokenizer(docs, tok_path, vocab_size=vocab_size)
    if shared:  # with what it was trained on, for tools/cache_dir.py
        record = {"vocab_size": vocab_size, "sources": data_cache.sources_record(train_files)}
        if _field(config) != documents.TEXT_FIELD:
            record["text_field"] = _field(config)
        data_cache.write_json_atomic(shared.removesuffix(".model") + ".json", record)
        _copy_atomic(tok_path, shared)


def prepare(config, workdir: str, train_files: list[str]) -> str:
    """The workdir's tokenizer.model, made ready for training (by process 0; the others
    wait): data.tokenizer (or the init_from run's) copied in, else one trained on the
    train files (or kept: it was trained for these). Returns its path."""
    main = jax.process_index() == 0
    tok_path = os.path.join(workdir, "tokenizer.model")
    tokenizer = config.data.tokenizer
    if not tokenizer and not ckpt_lib.checkpoint_steps(workdir):  # a resume keeps its own
        tokenizer = _from_init_run(config, tok_path, main)
    spec_path = os.path.join(workdir, "tokenizer.json")
    if not tokenizer and ckpt_lib.checkpoint_steps(workdir) and not os.path.exists(tok_path):
        # Every process (a shared workdir): none is left waiting for process 0.
        raise FileNotFoundError(
            f"{tok_path} is gone, and {workdir}'s checkpoints were trained with it (their "
            "embeddings are its ids): copy it back, or give it with "
            "--config.data.tokenizer; a new one would not match"
        )
    if main and tokenizer:
        model, renumbered = tok.model_bytes(tokenizer)  # fail early on a bad file
        pieces = tok.from_model_bytes(model, tokenizer).get_piece_size()
        asked = config.data.vocab_size
        if asked != config_lib.base_config().data.vocab_size and asked != pieces:
            metrics_lib.say(
                f"lrulm: data.vocab_size={asked} is not used: the tokenizer taken "
                f"({tokenizer}) has {pieces} pieces (data.vocab_size sizes a tokenizer "
                "trained here)"
            )
        if os.path.abspath(tokenizer) != os.path.abspath(tok_path):
            check_same(tokenizer, tok_path, workdir)
            new = not os.path.exists(tok_path) or _read(tok_path) != model
            _copy_atomic(tokenizer, tok_path, model)
            if renumbered and new:  # a public model (Llama's, Gemma's): specials moved to 0-3
                metrics_lib.say(f"lrulm: {renumbered}; {tok_path} holds it so renumbered")
            if os.path.exists(spec_path):  # it described the tokenizer replaced
                os.remove(spec_path)
    elif main:
        from lrulm import run_config  # here: it imports the tasks, which import this

        spec = _spec(config, train_files)
        started = run_config.started_in(workdir)  # the files as the run named them there
        same = [_spec(config, train_files, started)] if started else []
        stale = os.path.exists(tok_path) and _stale(tok_path, spec_path, spec, workdir, same)
        if stale or not os.path.exists(tok_path):
            _train(config, tok_path, train_files)
            data_cache.write_json_atomic(spec_path, spec)
    distributed.barrier("lrulm_tokenizer")
    return tok_path
