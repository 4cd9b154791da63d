"""A tiny LRU language model on the embedded default corpus (the stdlib's source).

    lrulm train --config configs/lm/tiny.py --workdir runs/tiny

Sized for a 2-core laptop CPU: ~0.9M parameters (4 blocks of width 128, 128 complex
state channels, an MLP of 256), 2048-piece tokenizer trained into the workdir, batches of
16 x 128 tokens, 300 steps in about 3 minutes. It should reach an eval loss near 3.3
nats per token (bits per byte ~1.3), against a unigram entropy of ~5.9 nats; the
samples from `lrulm generate` look like Python.

`:test` is a smaller variant for the test suite (seconds per step count, not minutes).
"""

from lrulm.config import base_config


def get_config(arg=None):
    c = base_config()
    c.task = "lm"
    c.model.preset = "tiny"
    c.data.vocab_size = 2048
    c.optim.lr = 3e-3  # small model, short run: a high peak rate with 10% warm-up
    c.optim.lr_factor = 0.5  # recurrent parameters (paper: 0.1-0.5 by task)
    c.optim.weight_decay = 0.05  # paper App. D.2
    c.optim.grad_clip = 1.0
    c.train.steps = 300
    c.train.global_batch_size = 16
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_steps = 8
    c.checkpoint.every_steps = 100
    if arg == "test":
        c.model.preset = "test"
        c.data.vocab_size = 512
        c.train.steps = 20
        c.train.global_batch_size = 8
        c.train.seq_len = 64
        c.train.log_every = 5
        c.train.eval_every = 10
        c.train.eval_steps = 2
        c.checkpoint.every_steps = 10
    elif arg not in (None, ""):
        raise ValueError(f"configs/lm/tiny.py takes no argument or 'test'; got {arg!r}")
    return c
