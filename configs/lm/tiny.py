"""A tiny LRU language model on the embedded default corpus (the stdlib's source).

    lrulm train --config configs/lm/tiny.py --workdir runs/tiny

Sized for a 2-core laptop CPU: ~0.9M parameters (4 blocks of width 128, 128 complex state
channels, an MLP of 256), a 2048-piece tokenizer trained into the workdir, batches of 32 x
128 tokens, 400 steps (1.6M tokens) in 1.5-5 minutes at 6-23k tokens/s. It reaches an eval
loss of ~2.6 nats per token (~1.5 bits per byte; the first 32k tokens of the held-out files,
on Python 3.11) against a unigram entropy of ~6.0 nats, and `lrulm generate` then writes
recognisably Python-shaped text (indented blocks, `self.` attributes, `if ...:` lines), if
not working code.

`:test` is a smaller variant for the test suite (seconds per step count, not minutes).
"""

from lrulm.config import base_config


def get_config(arg=None):
    c = base_config()
    c.task = "lm"
    c.model.preset = "tiny"
    c.data.vocab_size = 2048
    c.optim.lr = 6e-3  # small model, short run: a high peak (3e-3, batch 16 ended at 4.9)
    c.optim.lr_factor = 0.5  # recurrent parameters (paper: 0.1-0.5 by task)
    c.optim.weight_decay = 0.05  # paper App. D.2
    c.optim.grad_clip = 1.0
    c.train.steps = 400
    c.train.global_batch_size = 32
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_steps = 8
    c.checkpoint.every_steps = 200
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
