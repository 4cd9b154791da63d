"""Small layers with logical axis names on every parameter: dense, embedding, norms.

Each parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per array
axis); `lrulm.sharding` maps those names to mesh axes. Parameters are float32; the
computation runs in the dtype of the input (bfloat16 when the model is configured so).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lrulm.sharding import constrain


def param(value: jax.Array, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    """A float parameter with one logical axis name per array axis."""
    if len(logical_axes) != value.ndim:
        raise ValueError(f"{len(logical_axes)} axis names {logical_axes} for shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(logical_axes))


class Dense(nnx.Module):
    """y = x W (+ b). W: (d_in, d_out), initialised N(0, scale / d_in) (LeCun normal)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        std = math.sqrt(scale / d_in)
        w = std * jax.random.truncated_normal(rngs.params(), -2, 2, (d_in, d_out), jnp.float32)
        self.kernel = param(w / 0.8796256610342398, axes)  # unit variance after truncation
        self.bias = param(jnp.zeros((d_out,)), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


@jax.custom_vjp
def _lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens] for a table FSDP splits by width, laid out so that XLA never has to
    move a batch-sharded (batch, length, width) array to width-sharded and replicated
    over data, which it can only do by gathering the whole array on every device
    ("involuntary full rematerialization", on meshes with both data and fsdp axes).

    The lookup reads the table gathered over fsdp, as every weight is before use, so its
    rows come out whole. The gradient, a scatter-add of the cotangent into the table,
    moves the cotangent's fsdp factor from batch to width (an all-to-all within each
    fsdp group); each device adds its rows into its width shard of the table, and the
    shards are summed over data.
    """
    return jnp.take(constrain(table, ("vocab", None)), tokens, axis=0)


def _lookup_fwd(table, tokens):
    return _lookup(table, tokens), (table, tokens)


def _lookup_bwd(residuals, g):
    table, tokens = residuals
    axes = ("data_batch", "length", *[None] * (tokens.ndim - 2))[: tokens.ndim]
    g = constrain(g, (*axes, "embed"))
    tokens = constrain(tokens, axes)
    grad = jnp.zeros(table.shape, g.dtype).at[tokens].add(g)
    return constrain(grad, ("vocab", "embed")).astype(table.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class Embed(nnx.Module):
    """Token embedding (v, h); also the tied output projection."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
        e = jax.random.normal(rngs.params(), (vocab_size, d_model), jnp.float32)
        self.embedding = param(e, ("vocab", "embed"))

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        return _lookup(self.embedding[...], tokens).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...h,vh->...v", x, self.embedding[...].astype(x.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.scale = param(jnp.ones((dim,)), ("embed",))
        self.eps = eps

    def __call__(self, x, *, mask=None, train=False):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.scale = param(jnp.ones((dim,)), ("embed",))
        self.bias = param(jnp.zeros((dim,)), ("embed",))
        self.eps = eps

    def __call__(self, x, *, mask=None, train=False):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class BatchNorm(nnx.Module):
    """Batch norm over (batch, length) as the LRU paper's LRA models use it.

    Statistics are taken over valid positions only (`mask`), in float32; running
    averages (nnx.BatchStat) are used at evaluation time.
    """

    def __init__(self, dim: int, *, momentum: float = 0.9, eps: float = 1e-5):
        self.scale = param(jnp.ones((dim,)), ("embed",))
        self.bias = param(jnp.zeros((dim,)), ("embed",))
        self.mean = nnx.BatchStat(jnp.zeros((dim,)), logical_axes=("embed",))
        self.var = nnx.BatchStat(jnp.ones((dim,)), logical_axes=("embed",))
        self.momentum, self.eps = momentum, eps

    def __call__(self, x, *, mask=None, train=False):
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            w = jnp.ones(x.shape[:-1] + (1,), jnp.float32) if mask is None else mask[..., None]
            w = w.astype(jnp.float32)
            count = jnp.maximum(jnp.sum(w), 1.0)
            mean = jnp.sum(x32 * w, axis=axes) / count
            var = jnp.sum(jnp.square(x32 - mean) * w, axis=axes) / count
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var)
        else:
            mean, var = self.mean[...], self.var[...]
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def dropout(
    x: jax.Array, rate: float, key: jax.Array | None, *, shared_axes: tuple[int, ...] = ()
) -> jax.Array:
    """Inverted dropout; the identity when rate is 0 or key is None (evaluation). The
    mask is drawn once along `shared_axes` (e.g. (1,): the same at every position)."""
    if rate <= 0.0 or key is None:
        return x
    shape = tuple(1 if i in shared_axes else d for i, d in enumerate(x.shape))
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
