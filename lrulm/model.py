"""LRU blocks, the layer stack (scanned over depth), the LM and the classifier heads.

Notation: b batch, l length, h d_model, n d_state, f d_ff, v vocab, k layers, c classes.

Block (paper Fig. 1, "Norm -> Recurrence -> GLU -> Skip"), pre-norm:

    y = x + Dropout(GLU(Dropout(GELU(LRU(Norm(x))))))
    GLU(z) = Dense(z) * sigmoid(Dense(z))        (half GLU: z * sigmoid(Dense(z)))

followed, when d_ff > 0, by a residual MLP sub-block (Norm -> Dense(h, f) -> GELU ->
Dense(f, h)), which language models use for capacity. This is the minimal-LRU / S5
block layout (GELU then GLU) that produced the paper's LRA numbers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lrulm import layers
from lrulm.lru import LRU
from lrulm.model_config import ModelConfig
from lrulm.sharding import constrain

ACT = ("batch", "length", "act_embed")


def _norm(cfg: ModelConfig):
    match cfg.norm:
        case "rms":
            return layers.RMSNorm(cfg.d_model)
        case "layer":
            return layers.LayerNorm(cfg.d_model)
        case "batch":
            return layers.BatchNorm(cfg.d_model)
    raise ValueError(f"unknown norm {cfg.norm!r}")


def _dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


class Block(nnx.Module):
    """One residual LRU block (+ optional MLP sub-block): (b, l, h) -> (b, l, h)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h = cfg.d_model
        self.cfg = cfg
        self.norm = _norm(cfg)
        self.lru = LRU(
            h,
            cfg.d_state,
            r_min=cfg.r_min,
            r_max=cfg.r_max,
            max_phase=cfg.max_phase,
            bidirectional=cfg.bidirectional,
            scan_method=cfg.scan_method,
            chunk_size=cfg.chunk_size,
            rngs=rngs,
        )
        self.glu_gate = layers.Dense(h, h, axes=("embed", "mlp"), rngs=rngs)
        self.glu_value = (
            layers.Dense(h, h, axes=("embed", "mlp"), rngs=rngs) if cfg.glu == "full" else None
        )
        if cfg.d_ff:
            self.mlp_norm = _norm(cfg)
            self.mlp_in = layers.Dense(h, cfg.d_ff, axes=("embed", "mlp"), rngs=rngs)
            self.mlp_out = layers.Dense(cfg.d_ff, h, axes=("mlp", "embed"), rngs=rngs)

    def __call__(
        self,
        x,
        *,
        mask=None,
        resets=None,
        train=False,
        key=None,
        axis_name=None,
        h0=None,
        return_state=False,
    ):
        """x: (b, l, h); mask: (b, l) valid positions (batch-norm statistics, the LRU's
        input zeroed elsewhere); resets:
        (b, l) document starts; key: dropout key (None = no dropout); h0: (b, n) LRU
        state to start from. Returns y (b, l, h), and the LRU's final state if asked."""
        rate = self.cfg.dropout if train else 0.0
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        shared = (1,) if self.cfg.dropout_over_length else ()  # one mask along l

        def drop(z, k):
            return layers.dropout(z, rate, k, shared_axes=shared)

        z = self.norm(x, mask=mask, train=train)
        if mask is not None:
            # Padding feeds the recurrence zeros, so its state stays exactly zero there: a
            # scan that runs through the padding before the real tokens (the reverse one of
            # a bidirectional layer, past right padding) carries nothing from it.
            z = jnp.where(mask[..., None], z, jnp.zeros((), z.dtype))
        state = None
        if return_state:
            z, state = self.lru(z, resets=resets, h0=h0, return_state=True, axis_name=axis_name)
        else:
            z = self.lru(z, resets=resets, h0=h0, axis_name=axis_name)
        z = checkpoint_name(z, "lru_out")
        z = drop(jax.nn.gelu(z), keys[0])
        value = z if self.glu_value is None else self.glu_value(z)
        z = value * jax.nn.sigmoid(self.glu_gate(z))
        x = x + drop(z, keys[1])
        x = constrain(x, ACT)
        if self.cfg.d_ff:
            z = self.mlp_norm(x, mask=mask, train=train)
            z = self.mlp_in(z)
            z = constrain(z, ("batch", "length", "act_mlp"))
            z = self.mlp_out(drop(jax.nn.gelu(z), keys[2]))
            x = constrain(x + drop(z, keys[3]), ACT)
        return (x, state) if return_state else x


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "lru": jax.checkpoint_policies.save_only_these_names("lru_out"),
}


def _prepend_layers_axis(state: nnx.State) -> nnx.State:
    def add(v):
        if isinstance(v, nnx.Variable) and "logical_axes" in v.get_metadata():
            return v.replace(logical_axes=("layers",) + tuple(v.get_metadata()["logical_axes"]))
        return v

    return jax.tree.map(add, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Stack(nnx.Module):
    """k blocks; with cfg.scan_layers their parameters are stacked on a leading
    "layers" axis and applied with jax.lax.scan, so compile time does not grow with k."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        if cfg.scan_layers:
            graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
            make = lambda key: nnx.state(Block(cfg, rngs=nnx.Rngs(params=key)))
            self.blocks = nnx.merge(graphdef, _prepend_layers_axis(jax.vmap(make)(keys)))
        else:
            self.blocks = nnx.List([Block(cfg, rngs=nnx.Rngs(params=k)) for k in keys])

    def __call__(
        self,
        x,
        *,
        mask=None,
        resets=None,
        train=False,
        key=None,
        axis_name=None,
        h0=None,
        return_state=False,
    ):
        """x (b, l, h) -> y (b, l, h). h0: optional (k, b, n) per-layer LRU states to
        start from; with return_state, also returns the (k, b, n) final states."""
        cfg = self.cfg
        keys = None if key is None else jax.random.split(key, cfg.num_layers)
        kw = dict(
            mask=mask, resets=resets, train=train, axis_name=axis_name, return_state=return_state
        )

        def layer(graphdef, x, layer_params, layer_rest, layer_key, layer_h0):
            block = nnx.merge(graphdef, layer_params, layer_rest)
            out = block(x, key=layer_key, h0=layer_h0, **kw)
            x, state = out if return_state else (out, None)
            return x, (nnx.state(block, nnx.Not(nnx.Param)), state)

        def remat(fn, in_scan):
            if cfg.remat == "none":
                return fn
            # Inside a scan nothing can be common-subexpression-eliminated across layers.
            return jax.checkpoint(fn, policy=_REMAT[cfg.remat], prevent_cse=not in_scan)

        if not cfg.scan_layers:
            states = []
            for i, block in enumerate(self.blocks):
                graphdef, params, rest = nnx.split(block, nnx.Param, ...)
                run = remat(functools.partial(layer, graphdef), in_scan=False)
                layer_key = None if keys is None else keys[i]
                x, (new_rest, state) = run(
                    x, params, rest, layer_key, None if h0 is None else h0[i]
                )
                nnx.update(block, new_rest)
                states.append(state)
            return (x, jnp.stack(states)) if return_state else x
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        body = remat(lambda x, xs: layer(graphdef, x, *xs), in_scan=True)
        x, (new_rest, states) = jax.lax.scan(body, x, (params, rest, keys, h0))
        nnx.update(self.blocks, new_rest)
        return (x, states) if return_state else x


class LanguageModel(nnx.Module):
    """tokens (b, l) -> logits (b, l, v) float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size < 2:
            raise ValueError(f"a language model needs model.vocab_size >= 2; got {cfg.vocab_size}")
        if cfg.norm == "batch":  # also checked with the config (experiment.validate)
            raise ValueError("a language model cannot use batch norm (it would see later tokens)")
        self.cfg = cfg
        self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.stack = Stack(cfg, rngs=rngs)
        self.final_norm = _norm(cfg)
        self.head = (
            None
            if cfg.tie_embeddings
            else layers.Dense(
                cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, rngs=rngs
            )
        )

    def features(
        self, tokens, *, resets=None, train=False, key=None, axis_name=None, h0=None,
        return_state=False,
    ):  # fmt: skip
        """tokens (b, l) -> final-norm features (b, l, h), and with return_state the
        recurrent states (k, b, n) after the last position."""
        x = constrain(self.embed(tokens, _dtype(self.cfg)), ACT)
        out = self.stack(
            x, resets=resets, train=train, key=key, axis_name=axis_name, h0=h0,
            return_state=return_state,
        )  # fmt: skip
        x, states = out if return_state else (out, None)
        x = self.final_norm(x, train=train)
        return (x, states) if return_state else x

    def head_weight(self, dtype) -> jax.Array:
        """The (h, v) output projection; tied embeddings are scaled so the logits start
        at unit variance (embeddings are N(0, 1))."""
        if self.head is None:
            return (self.embed.embedding[...].T * (self.cfg.d_model**-0.5)).astype(dtype)
        return self.head.kernel[...].astype(dtype)

    def __call__(
        self,
        tokens,
        *,
        resets=None,
        train=False,
        key=None,
        axis_name=None,
        h0=None,
        return_state=False,
    ):
        """tokens (b, l) -> logits (b, l, v); with return_state also the (k, b, n)
        recurrent states after the last position (what generation carries)."""
        kw = dict(resets=resets, train=train, key=key, axis_name=axis_name, h0=h0)
        if return_state:
            x, states = self.features(tokens, return_state=True, **kw)
        else:
            x, states = self.features(tokens, **kw), None
        # float32 logits from the matmul itself (not rounded to a bfloat16 x's dtype):
        # the same numbers the loss is trained on (cross_entropy).
        logits = constrain(
            head_logits(x, self.head_weight(x.dtype)), ("batch", "length", "act_vocab")
        )
        return (logits, states) if return_state else logits

    def init_state(self, batch_size: int) -> jax.Array:
        """Zero recurrent state, (k, b, n) complex64."""
        c = self.cfg
        return jnp.zeros((c.num_layers, batch_size, c.d_state), jnp.complex64)


@jax.custom_vjp
def head_logits(x, w):
    """(b, l, h) x (h, v) -> float32 (b, l, v) logits, accumulated in float32 and not
    rounded to x's dtype (bfloat16 logits would cost a trained model ~0.03 nats). The
    backward multiplies in x's dtype with float32 accumulation, as the blocked loss does:
    autodiff of the float32 product would run both backward matmuls in float32."""
    return jnp.einsum("blh,hv->blv", x, w, preferred_element_type=jnp.float32)


def _head_logits_forward(x, w):
    return head_logits(x, w), (x, w)


def _logit_grads(x, w, d):
    """The gradients of x @ w for d(logits) d, in x's dtype with float32 accumulation:
    (dx, dw), float32 each."""
    d = d.astype(x.dtype)
    dx = jnp.einsum("blv,hv->blh", d, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("blh,blv->hv", x, d, preferred_element_type=jnp.float32)
    return dx, dw


def _head_logits_backward(residuals, g):
    x, w = residuals
    dx, dw = _logit_grads(x, w, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


head_logits.defvjp(_head_logits_forward, _head_logits_backward)


def cross_entropy(x, w, targets, *, vocab_block: int = 0):
    """Per-position cross-entropy and argmax-correctness of logits x @ w, (b, l) each
    (`cross_entropy_and_lse` without the log-partition)."""
    losses, _, correct = cross_entropy_and_lse(x, w, targets, vocab_block=vocab_block)
    return losses, correct


def cross_entropy_and_lse(x, w, targets, *, vocab_block: int = 0):
    """Per-position cross-entropy, log-partition log Z = logsumexp(logits) (what a z-loss
    keeps near 0) and argmax-correctness of logits x @ w, (b, l) each; the first two are
    differentiable.

    With vocab_block > 0 the (b, l, v) logits are never materialised: a scan over blocks
    of the vocabulary keeps a running max, sum of exponentials, the target's logit and
    the argmax. The backward pass is written by hand (a custom VJP): a second scan
    recomputes each block's logits and forms d(logits) = g * (softmax - onehot) there,
    the one-hot by comparing the block's column ids with the targets, so no gather has
    a scatter for its gradient (at batch 1 XLA builds that scatter as several (l, block)
    buffers). Memory per position drops from v floats (x2 for the gradient) to
    vocab_block; the values and gradients are those of the full softmax.

    Args:
      x: (b, l, h) features.
      w: (h, v) output projection.
      targets: (b, l) int token ids.
      vocab_block: vocabulary block size (the last block may be partial); 0 = one block
        (plain logits).
    """
    v = w.shape[1]
    if not vocab_block or vocab_block >= v:
        logits = constrain(head_logits(x, w), ("batch", "length", "act_vocab"))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        lse = jax.nn.logsumexp(logits, -1)
        return losses, lse, jnp.argmax(logits, -1) == targets
    losses, lse, best_id = _blocked_cross_entropy(x, w, targets, vocab_block)
    return losses, lse, best_id == targets


def _vocab_blocks(w, vocab_block: int):
    """(h, v) -> (num, h, vocab_block) blocks (zero-padded) and each block's first id."""
    v = w.shape[1]
    num = -(-v // vocab_block)
    if num * vocab_block > v:  # a ragged last block: zero columns, masked to -inf
        w = jnp.pad(w, ((0, 0), (0, num * vocab_block - v)))
    blocks = w.reshape(w.shape[0], num, vocab_block).transpose(1, 0, 2)
    return blocks, jnp.arange(num, dtype=jnp.int32) * vocab_block


def _block_logits(x, w_block, offset, v: int):
    """f32 logits of one vocabulary block, (b, l, vb), padding columns at -inf; and the
    vocabulary id of each column."""
    ids = offset + jnp.arange(w_block.shape[-1], dtype=offset.dtype)
    logits = jnp.einsum("blh,hv->blv", x, w_block, preferred_element_type=jnp.float32)
    if v % w_block.shape[-1]:
        logits = jnp.where(ids < v, logits, -jnp.inf)
    return logits, ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_cross_entropy(x, w, targets, vocab_block):
    return _blocked_forward(x, w, targets, vocab_block)[0]


def _blocked_forward(x, w, targets, vocab_block):
    v = w.shape[1]
    blocks, offsets = _vocab_blocks(w, vocab_block)
    targets = targets.astype(jnp.int32)
    shape = targets.shape
    ninf = jnp.full(shape, -jnp.inf, jnp.float32)
    zeros = jnp.zeros(shape, jnp.float32)
    init = (ninf, zeros, zeros, ninf, jnp.zeros(shape, jnp.int32))

    def body(carry, block):
        m, s, target_logit, best, best_id = carry
        logits, ids = _block_logits(x, *block, v)
        block_max = jnp.max(logits, -1)
        new_m = jnp.maximum(m, block_max)
        s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[..., None]), -1)
        hit = ids == targets[..., None]
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), -1)
        better = block_max > best
        best_id = jnp.where(better, jnp.argmax(logits, -1).astype(jnp.int32) + block[1], best_id)
        return (new_m, s, target_logit, jnp.maximum(best, block_max), best_id), None

    (m, s, target_logit, _, best_id), _ = jax.lax.scan(body, init, (blocks, offsets))
    lse = m + jnp.log(s)
    return (lse - target_logit, lse, best_id), (x, w, targets, lse)


def _blocked_backward(vocab_block, residuals, cotangents):
    x, w, targets, lse = residuals
    g = cotangents[0].astype(jnp.float32)  # of the losses: softmax - onehot
    g_lse = cotangents[1].astype(jnp.float32)  # of log Z: softmax
    v = w.shape[1]
    blocks, offsets = _vocab_blocks(w, vocab_block)

    def body(dx, block):
        logits, ids = _block_logits(x, *block, v)
        p = jnp.exp(logits - lse[..., None])  # softmax; 0 in padding columns
        onehot = (ids == targets[..., None]).astype(jnp.float32)
        d = (g + g_lse)[..., None] * p - g[..., None] * onehot
        dx_block, dw = _logit_grads(x, block[0], d)
        return dx + dx_block, dw.astype(w.dtype)

    dx, dw = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (blocks, offsets))
    dw = dw.transpose(1, 0, 2).reshape(w.shape[0], -1)[:, :v]
    return dx.astype(x.dtype), dw, None


_blocked_cross_entropy.defvjp(_blocked_forward, _blocked_backward)


class Classifier(nnx.Module):
    """Sequence classifier for LRA: encoder -> Stack -> pooling -> head.

    Inputs are token ids (b, l) when cfg.vocab_size > 0, else features (b, l, channels).
    With `dual=True` (Retrieval) two documents, shaped (b, 2, l), go through the same
    tower and are combined as [a, b, a - b, a * b] before the head.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        num_classes: int,
        input_channels: int = 1,
        pooling: str = "mean",
        dual: bool = False,
        rngs: nnx.Rngs,
    ):
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last'; got {pooling!r}")
        self.cfg, self.pooling, self.dual = cfg, pooling, dual
        h = cfg.d_model
        if cfg.vocab_size:
            self.encoder = layers.Embed(cfg.vocab_size, h, rngs=rngs)
        else:
            # BatchNorm takes out any constant per channel, on every path from the encoder
            # (each block's norm, the final norm): a bias would get zero gradient and
            # move only by Adam's noise, shifting the eval-time statistics.
            self.encoder = layers.Dense(
                input_channels, h, axes=(None, "embed"), use_bias=cfg.norm != "batch", rngs=rngs
            )
        self.stack = Stack(cfg, rngs=rngs)
        self.final_norm = _norm(cfg)
        width = 4 * h if dual else h
        self.head_hidden = (
            layers.Dense(width, h, axes=("mlp", "embed"), rngs=rngs) if dual else None
        )
        self.head = layers.Dense(h, num_classes, axes=("embed", None), rngs=rngs)

    def _encode(self, inputs, mask, train, key):
        dtype = _dtype(self.cfg)
        if self.cfg.vocab_size:
            x = self.encoder(inputs, dtype)
        else:
            x = self.encoder(inputs.astype(dtype))
        x = constrain(x, ACT)
        x = self.stack(x, mask=mask, train=train, key=key)
        x = self.final_norm(x, mask=mask, train=train).astype(jnp.float32)
        m = mask.astype(jnp.float32)[..., None]
        if self.pooling == "mean":
            return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)  # last valid position
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]

    def __call__(self, inputs, mask, *, train=False, key=None):
        """inputs (b, l) or (b, l, channels), (b, 2, l) if dual; mask like inputs'
        (b, l) / (b, 2, l). Returns logits (b, c) float32."""
        if not self.dual:
            return self.head(self._encode(inputs, mask, train, key))
        b = inputs.shape[0]
        both = jnp.concatenate([inputs[:, 0], inputs[:, 1]], axis=0)  # one tower, 2b rows
        both_mask = jnp.concatenate([mask[:, 0], mask[:, 1]], axis=0)
        pooled = self._encode(both, both_mask, train, key)
        a, c = pooled[:b], pooled[b:]
        z = jnp.concatenate([a, c, a - c, a * c], axis=-1)
        return self.head(jax.nn.gelu(self.head_hidden(z)))
