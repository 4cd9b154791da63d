"""How a new token is drawn from a language model's logits: `Sampling` (temperature, top_k,
top_p, min_p and the repetition penalties), the per-row keys that make a row's draws its
own in any batch, and the argument checks `lrulm generate` shares."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each new token is drawn from the model's logits, in this order: the penalties
    on tokens already seen, the temperature (0: greedy, the rest then do nothing), top_k,
    top_p (the smallest set of tokens holding that probability mass), min_p (drops the
    tokens less likely than min_p times the likeliest one).

    repetition_penalty (CTRL's, as in Hugging Face's and vLLM's generate; 1 = off): each
    token of the prompt or of the text generated so far has its logit divided by it where
    positive and multiplied by it where negative. presence_penalty and frequency_penalty
    (OpenAI's, on the generated tokens only; 0 = off): subtracted from a token's logit
    once if it was generated, and once per time it was."""

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy); got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0 or self.top_k != int(self.top_k):
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off); got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 = off); got {self.min_p}")
        r = self.repetition_penalty
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off); got {r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(value := getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 = off); got {value}")
        # Hashable and exact: jit takes the sampling as a static argument.
        for field in dataclasses.fields(self):
            cast = int if field.name == "top_k" else float
            object.__setattr__(self, field.name, cast(getattr(self, field.name)))

    @property
    def penalised(self) -> bool:
        """Whether drawing depends on the tokens seen (the decode loop then counts them)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def check_max_new_tokens(max_new_tokens: int) -> None:
    if not 1 <= max_new_tokens < 2**31:
        raise ValueError(f"max_new_tokens must be in [1, 2**31); got {max_new_tokens}")


def check_seed(seed: int) -> None:
    # jax.random.key keeps 32 bits (without jax_enable_x64): 2**32 would sample as 0.
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32); got {seed}")


def penalize_logits(logits, seen, counts, sampling: Sampling):
    """`Sampling`'s penalties on float logits (b, v): `seen` (b, v) marks the tokens of each
    row's prompt or generated text (repetition_penalty), `counts` (b, v) how often each was
    generated (presence_penalty, frequency_penalty)."""
    r = sampling.repetition_penalty
    if r != 1.0:
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    if sampling.presence_penalty or sampling.frequency_penalty:
        counts = counts.astype(logits.dtype)
        logits = logits - sampling.frequency_penalty * counts
        logits = logits - sampling.presence_penalty * (counts > 0).astype(logits.dtype)
    return logits


def sample_logits(key, logits, *, temperature: float, top_p: float, top_k: int, min_p: float = 0.0):
    """Samples token ids (b,) from logits (b, v): greedy at temperature 0, else
    temperature-scaled, restricted to the top_k, to the top_p probability mass and to the
    tokens at least min_p times as likely as the likeliest (`Sampling`).
    `key` is one key for the whole batch or a (b,) array of keys, one per row."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shifted first: a tiny temperature then sends all but the best to -inf, not to inf.
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if 0 < top_k < logits.shape[-1]:  # a top_k as large as the vocabulary keeps it all
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = jnp.where(before >= top_p, -jnp.inf, sorted_logits)
        logits = (
            jnp.full_like(logits, -jnp.inf)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(sorted_logits)
        )
    if min_p > 0.0:  # the likeliest token's logit is 0 here (shifted; kept by the filters)
        logits = jnp.where(logits < math.log(min_p), -jnp.inf, logits)
    # A key per row (typed keys (b,), or raw uint32 keys (b, 2)): a row's draw does not
    # depend on the other rows. One key: typed (), or raw (2,) from jax.random.PRNGKey.
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def row_keys(key, rows) -> jax.Array:
    """One sampling key per row: `key` folded with each row's index (a sequence of ints),
    so a row's sample is the same whatever batch it is decoded in."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(list(rows), jnp.uint32))
