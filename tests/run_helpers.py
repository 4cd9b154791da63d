"""Helpers the trainer's test files share."""

import json
import os
import re
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np

from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import train
from lrulm.data import tokenizer as tok

TINY = "configs/lm/tiny.py:test"


def tiny_config(*overrides, corpus=None):
    """configs/lm/tiny.py:test with "key=value" overrides, on the small test corpus."""
    pairs = [tuple(o.split("=", 1)) for o in overrides]
    if corpus is not None:
        pairs += [("data.train_files", corpus["train"]), ("data.eval_files", corpus["eval"])]
    return config_lib.load_with_overrides(
        TINY, [(k.removeprefix("--config."), v) for k, v in pairs]
    )


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process a test starts: `devices` simulated CPU devices, and the
    session's other XLA flags (conftest.py's)."""
    count = "--xla_force_host_platform_device_count="
    others = re.sub(count + r"\d+", "", os.environ.get("XLA_FLAGS", "")).split()
    return " ".join([f"{count}{devices}", *others])


def random_prompts(lengths, seed=0, vocab=128):
    """Prompts of those lengths, of random ids past the special ones."""
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, n).tolist() for n in lengths]


def training_view_logits(model, seq):
    """A language model's logits of a whole sequence with the resets training uses (a new
    document after each EOS): (len(seq), v)."""
    tokens = jnp.asarray([seq])
    resets = jnp.pad(tokens[:, :-1] == tok.EOS_ID, ((0, 0), (1, 0)))
    return model(tokens, resets=resets)[0]


def dummy_prefix_tokenizer(prefix, texts, vocab_size: int) -> str:
    """A sentencepiece model with a dummy prefix (a space before each text, as many
    public tokenizers have; lrulm's own has none), lrulm's special ids; its path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size,
        add_dummy_prefix=True, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
    )  # fmt: skip
    return str(prefix) + ".model"


def train_args(workdir, corpus, *overrides):
    """The arguments of `lrulm train` of tiny:test on the test corpus, logging every step
    with no evaluation; "key=value" overrides (those keys too)."""
    settings = {
        "data.train_files": corpus["train"],
        "data.eval_files": corpus["eval"],
        "train.log_every": "1",
        "train.eval_every": "0",
    }
    settings.update(o.split("=", 1) for o in overrides)
    args = ["train", "--config", TINY, "--workdir", str(workdir)]
    return args + [f"--config.{k}={v}" for k, v in settings.items()]


def train_command(workdir, corpus, *overrides):
    """`python -m lrulm train` of train_args."""
    return [sys.executable, "-m", "lrulm", *train_args(workdir, corpus, *overrides)]


def run_train(workdir, corpus, *overrides, timeout=300):
    """train_command run to its end (it must succeed): its stdout and stderr."""
    out = subprocess.run(
        train_command(workdir, corpus, *overrides), capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def wait_for(path, proc, timeout=240):
    """Until `path` exists, while the process `proc` runs."""
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.time() - start < timeout, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def logged_losses(workdir):
    """step -> train/loss, the last logged value of each step (a resumed run repeats some)."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def saved_params(workdir, step):
    """The parameters of a run's checkpoint `step`, as numpy arrays."""
    return ckpt_lib.read_numpy(os.path.join(workdir, "checkpoints", str(step), "state"), "params")


def train_here(workdir, corpus_files, *overrides):
    """train_and_evaluate in this process (tiny:test, 8 devices on the data axis), logging
    every step with no evaluation, saving synchronously."""
    train_file, eval_file = corpus_files
    config = tiny_config(
        "train.log_every=1", "train.eval_every=0", "checkpoint.async_save=false", *overrides,
        corpus={"train": train_file, "eval": eval_file},
    )  # fmt: skip
    return train.train_and_evaluate(config, str(workdir))
