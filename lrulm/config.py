"""Experiment configs: load `FILE.py[:ARG]`, apply `--config.a.b=VALUE` overrides, save.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`. The loaded
config is locked: an override of a key that does not exist fails at once, naming the
closest existing key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Sequence

import ml_collections
from ml_collections import ConfigDict


class ConfigError(ValueError):
    """A config file, argument or override is wrong; the message says how to fix it."""


def load(spec: str) -> ConfigDict:
    """Loads `path/to/config.py[:arg]` and returns its locked ConfigDict; a run's
    WORKDIR/config.json gives the config that run was trained with."""
    path, _, arg = spec.partition(":")
    if os.path.isdir(path):
        raise ConfigError(
            f"--config {spec} is a directory; give a config file in it (CONFIG.py[:ARG], "
            "e.g. configs/lm/tiny.py), or a run's config.json"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (from --config {spec})")
    if path.lower().endswith(".json"):  # a run's own record: train it again, or evaluate it
        if arg:
            raise ConfigError(f"--config {spec}: a config.json takes no :ARG")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} does not read as JSON ({e})") from None
        if not isinstance(data, dict) or "task" not in data:
            raise ConfigError(f'{path} is no run\'s config.json (no "task" in it)')
        return from_dict(data)
    if not path.endswith(".py"):
        raise ConfigError(
            f"--config {spec}: give a Python config file (CONFIG.py[:ARG]) or a run's config.json"
        )
    name = "lrulm_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg=None) function")
    config = module.get_config(arg or None) if arg else module.get_config()
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    return config


def _all_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, ConfigDict):
            keys += _all_keys(value, full + ".")
    return keys


def _parse(text: str, current):
    """VALUE as the type of the field it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected true or false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)  # 1e5 for an int field
            except ValueError:
                value = None
            if value is None or not value.is_integer():
                raise ConfigError(f"expected an integer, got {text!r}") from None
            return int(value)
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = ast.literal_eval(text) if text.strip().startswith(("(", "[")) else text.split(",")
        return type(current)(value)
    if text.lower() in ("true", "false"):  # placeholders have no type to go by
        return text.lower() == "true"
    try:  # None / placeholders: a Python literal, else the string itself
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def override(config: ConfigDict, key: str, text: str) -> None:
    """Sets config[key] (a dotted path) from its string form."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents + [leaf]):
        if not isinstance(node, ConfigDict) or part not in node:
            known = _all_keys(config)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if i < len(parents):
            node = node[part]
    current = node[leaf]
    if isinstance(current, ConfigDict):
        fields = ", ".join(sorted(current.keys())[:12])
        more = ", ..." if len(current) > 12 else ""
        raise ConfigError(
            f"{key!r} is a group of settings; set one of its fields "
            f"(--config.{key}.FIELD=VALUE; fields: {fields}{more})"
        )
    if current is None:  # a placeholder (e.g. model.*: the preset's value): its declared type
        try:
            declared = node.get_ref(leaf).get_type()
        except ValueError:  # a plain None (a config read back from config.json): no type
            declared = None
        if declared in (bool, int, float, str) and text.strip().lower() != "none":
            current = declared()
    try:
        node[leaf] = _parse(text, current)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ConfigError(f"--config.{key}={text}: {e}") from None


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """`--config.a.b=V` / `--config.a.b V` pairs from a command line; others are errors."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r}")
        key, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            value, i = args[i + 1], i + 1
        pairs.append((key, value))
        i += 1
    return pairs


def load_with_overrides(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    config = load(spec)
    for key, value in overrides:
        override(config, key, value)
    return config


def to_dict(config: ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def from_dict(data: dict) -> ConfigDict:
    """A locked ConfigDict from a dict written by `to_dict` (e.g. a workdir's config.json).
    Keys added to lrulm since it was written take their defaults (`base_config`), so a
    run's config.json takes overrides of them (`lrulm eval --config.train.NEW=...`)."""
    config = ml_collections.ConfigDict(_with_defaults(data, to_dict(base_config())))
    config.lock()
    return config


def write_run_config(config: ConfigDict, workdir: str, *, resumed: bool) -> list[str]:
    """Writes WORKDIR/config.json (atomically). On a resume, returns what changed against
    the config.json there, as "key: old -> new" lines."""
    path = os.path.join(workdir, "config.json")
    new = to_dict(config)
    changed = []
    if resumed and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        # A key added to lrulm since the run started, at its default: the run's behaviour.
        defaults = dict(_leaves(to_dict(base_config())))
        show = lambda v: "unset" if v is _MISSING else repr(v)
        changed = [
            f"{key}: {show(a)} -> {show(b)}"
            for key, a, b in _changed_keys(old, new)
            if not (a is _MISSING and key in defaults and defaults[key] == b)
        ]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2)
    os.replace(tmp, path)
    return changed


_MISSING = object()


def _with_defaults(data: dict, defaults: dict) -> dict:
    """data, with the keys of `defaults` it lacks (nested dicts merged)."""
    out = dict(data)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def _leaves(tree: dict, prefix: str = ""):
    """("a.b.c", value) for each leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _changed_keys(old: dict, new: dict, prefix: str = ""):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b


def base_config() -> ConfigDict:
    """Every key the trainer, launch scripts and docs rely on, with neutral defaults.

    Experiment files in configs/ start from this and set what they are about.
    Model fields left as None come from `model.preset` (lrulm.model_config.PRESETS).
    """
    from ml_collections.config_dict import placeholder

    c = ConfigDict()
    c.task = "lm"  # "lm" or an LRA task: listops, text, retrieval, image, pathfinder, pathx

    c.model = ConfigDict()
    c.model.preset = "tiny"
    for name, kind in [
        ("num_layers", int),
        ("d_model", int),
        ("d_state", int),
        ("d_ff", int),
        ("vocab_size", int),
        ("dropout", float),
        ("dropout_over_length", bool),
        ("r_min", float),
        ("r_max", float),
        ("max_phase", float),
        ("dtype", str),
        ("norm", str),
        ("glu", str),
        ("remat", str),
        ("scan_method", str),
        ("chunk_size", int),
        ("bidirectional", bool),
        ("tie_embeddings", bool),
        ("scan_layers", bool),
    ]:
        c.model[name] = placeholder(kind)

    c.data = ConfigDict()
    c.data.train_files = ""  # globs, comma-separated; "" = the embedded default corpus
    # Train data from several sources in fixed proportions, in place of data.train_files:
    # "NAME=GLOBS@WEIGHT;...", e.g. "web=data/web/*.jsonl@0.7;code=data/code/*.jsonl@0.3".
    c.data.mixture = ""
    c.data.eval_files = ""  # "" = held-out files: every 50th train file (or the default's)
    # More held-out sets, each evaluated and logged apart (eval/NAME/loss, ...):
    # "NAME=GLOBS;NAME=GLOBS", e.g. "code=held/code/*.jsonl;prose=held/books/*.txt".
    c.data.eval_sets = ""
    c.data.text_field = "text"  # JSON lines: the field that holds the text (e.g. "content")
    c.data.tokenizer = ""  # a sentencepiece .model; "" = train one into the workdir
    c.data.vocab_size = 2048  # of the tokenizer trained when data.tokenizer is ""
    c.data.reset_at_doc_boundaries = True  # zero the recurrent state at each new document
    c.data.data_dir = ""  # LRA: where the task's files are (docs/design.md §2 layouts)
    c.data.on_error = "raise"  # LRA: "raise" on malformed records, or "skip" and count
    c.data.num_threads = 2  # Grain read threads per process
    # A folder runs share (sweeps on one corpus): tokenizers and tokenized splits kept by
    # their content, made once. "" = each workdir's own data/.
    c.data.cache_dir = ""
    c.data.seed = -1  # the train data's shuffling order; -1 = train.seed (which inits the model)

    c.optim = ConfigDict()
    c.optim.lr = 1e-3
    c.optim.lr_factor = 1.0  # recurrent parameters (ν, θ, γ, B) train at lr * lr_factor
    c.optim.weight_decay = 0.05  # paper App. D.2; none on the recurrent parameters
    c.optim.warmup_fraction = 0.1  # paper App. D.2: warm-up over the first 10% of steps
    c.optim.schedule = "cosine"  # after the warm-up: cosine (paper) | linear | constant | wsd
    c.optim.decay_fraction = 0.2  # wsd: the last 20% of the steps decay linearly to ~1e-7
    c.optim.final_lr_fraction = 0.0  # the decay ends at lr * this (0: ~1e-7, the paper's)
    c.optim.no_decay = ""  # regexes (comma-separated) of paths without weight decay: "scale,bias"
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 = off
    c.optim.grad_accum_steps = 1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    # An exponential moving average of the weights with this decay (e.g. 0.999; 0 = none),
    # evaluated, kept in checkpoints and used by generate/score/export in their place.
    c.optim.optimizer = "adamw"  # or "muon" for the hidden matrices (lrulm/optim.py)
    c.optim.mu_dtype = ""  # the first moment's dtype: "" (the parameters') or "bfloat16"
    c.optim.ema = 0.0

    c.train = ConfigDict()
    c.train.steps = 1000
    # Stop (saved; `lrulm train` exits 75, resumable) once this long has passed since the
    # start, checked at log steps: below a job's time limit, with room for the save. 0: none.
    c.train.time_limit_minutes = 0.0
    c.train.global_batch_size = 16
    c.train.seq_len = 256
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_at_start = False  # also evaluate the initial state (step 0) of a new run
    # Also the eval loss by context length (eval/loss_ctxN: the predictions that saw N to
    # 2N - 1 tokens of their document or row): how much of its context a model uses.
    c.train.eval_by_context = False
    c.train.eval_steps = 10  # batches per evaluation; <= 0: the whole eval split, once
    # (LRA's final test split is always read whole)
    c.train.progress = True  # a progress line with tokens/s on process 0
    # LM loss over vocabulary blocks of this size (0 = whole logits): the (b, l, v) f32
    # logits and their gradient otherwise dominate activation memory at long contexts.
    c.train.loss_vocab_block = 0
    # Train against (1 - e) onehot + e uniform (over the tokenizer's ids, or the classes);
    # evaluations score the plain cross-entropy, also logged as train/cross_entropy.
    c.train.label_smoothing = 0.0
    c.train.z_loss = 0.0  # LM: + z_loss * logsumexp(logits)**2 a token in training (PaLM: 1e-4)
    # A jax.profiler trace of train.profile_steps steps after step profile_start_step (never
    # the compiling first step of a run) on process 0, into WORKDIR/tensorboard; 0 = off.
    c.train.profile_steps = 0
    c.train.profile_start_step = 1

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.sequence = 1
    c.mesh.dcn_data = 1  # multi-slice: slices along the data axis (DCN)
    c.mesh.dcn_fsdp = 1

    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 500
    # Also save when this many minutes have passed since the last save (0: off), checked
    # at each log step: a bound on the work a crash loses whatever a step takes.
    c.checkpoint.every_minutes = 0.0
    c.checkpoint.max_to_keep = 3  # the newest kept; 0: every one
    c.checkpoint.keep_period = 0  # keep every checkpoint at a multiple of this; 0 = none
    c.checkpoint.init_from = ""  # another run's checkpoint dir: start from its parameters
    # Only the parameters whose paths these regexes find (comma-separated; "" = all), e.g.
    # "^stack/" for an LM's recurrent stack under a classifier's or a new vocabulary's head.
    c.checkpoint.init_from_params = ""
    c.checkpoint.async_save = True
    # Also keep the checkpoint with the best value of an evaluation metric in WORKDIR/best/
    # (`lrulm eval/generate/score --best`): a language model's "loss", "bits_per_byte",
    # "perplexity" or "accuracy" of the eval split, or "NAME/loss" of a data.eval_sets set;
    # "" = none. LRA runs always keep the best eval accuracy (the paper's protocol).
    c.checkpoint.keep_best = ""
    # A resume goes on at the row of the shuffled train order where the checkpoint left
    # off, with any global batch; with another seq_len, seed or train split that order is
    # another one, so such a resume is refused unless this is set.
    c.checkpoint.allow_data_change = False
    return c
