"""Helpers the trainer's test files share."""

from lrulm import config as config_lib

TINY = "configs/lm/tiny.py:test"


def tiny_config(*overrides, corpus=None):
    """configs/lm/tiny.py:test with "key=value" overrides, on the small test corpus."""
    pairs = [tuple(o.split("=", 1)) for o in overrides]
    if corpus is not None:
        pairs += [("data.train_files", corpus["train"]), ("data.eval_files", corpus["eval"])]
    return config_lib.load_with_overrides(
        TINY, [(k.removeprefix("--config."), v) for k, v in pairs]
    )
