"""Helpers the trainer's test files share."""

import jax.numpy as jnp
import numpy as np

from lrulm import config as config_lib
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
