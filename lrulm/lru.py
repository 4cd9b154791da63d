"""The Linear Recurrent Unit (Orvieto et al. 2023, arXiv 2303.06349), as a Flax NNX layer.

Notation: b batch, l length, h model width (d_model), n state size (d_state).

    x_k = Λ x_{k-1} + exp(γ_log) ⊙ (B u_k)        x ∈ C^n, u ∈ R^h
    y_k = Re(C x_k) + D ⊙ u_k                     y ∈ R^h
    Λ = diag(exp(-exp(ν_log) + i exp(θ_log)))     so |λ| < 1 whatever ν_log is
                                                  (in float32 too: see _lambda_parts).

Parameters carry the names of the paper's reference code (nu_log, theta_log, gamma_log,
B_re, B_im, C_re, C_im, D) so trees map both ways. They and the recurrence stay in
float32 / complex64 whatever the dtype of the activations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lrulm import scan as scan_lib
from lrulm import sequence_parallel, sharding
from lrulm.layers import param

# The least decay rate -log|λ|: float32's exp(-rate) is below 1 from here up.
_MIN_DECAY_RATE = 2.0**-23


def check_ring(r_min: float, r_max: float, max_phase: float) -> None:
    """Raises ValueError unless 0 <= r_min < r_max < 1 and max_phase > 0."""
    if not 0.0 <= r_min < r_max:
        raise ValueError(f"the LRU ring needs 0 <= r_min < r_max; got r_min={r_min}, r_max={r_max}")
    if r_max >= 1.0 or 1.0 - r_max**2 < 2 * _MIN_DECAY_RATE:  # float32 rounds it to 1
        raise ValueError(
            f"r_max={r_max} would let |λ| reach 1 (in float32) and the state grow without "
            "bound; use r_max <= 1 - 2**-23 (the paper uses at most 0.9999)"
        )
    if not max_phase > 0.0:
        raise ValueError(f"max_phase must be positive (the paper uses 2π or π/10); got {max_phase}")


def ring_init(key, d_state: int, r_min: float, r_max: float, max_phase: float):
    """Lemma 2 of the paper: λ uniform on the ring r_min <= |λ| <= r_max, phase in
    [0, max_phase]. Returns (nu_log, theta_log), each of shape (n,)."""
    k1, k2 = jax.random.split(key)
    tiny = jnp.finfo(jnp.float32).tiny  # keeps log() finite when r_min = 0
    u1 = jax.random.uniform(k1, (d_state,), jnp.float32, minval=tiny)
    u2 = jax.random.uniform(k2, (d_state,), jnp.float32, minval=tiny)
    nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
    theta_log = jnp.log(max_phase * u2)
    return nu_log, theta_log


def _next_segment_starts(resets: jax.Array, axis_name: str | None) -> jax.Array:
    """resets[..., :1] of the sequence's next segment, (..., 1): whether a document starts
    right after this one's end. Past the end of the sequence, or without a split (no
    axis_name), nothing follows: True (the reverse scan starts there from zero)."""
    last = jnp.ones_like(resets[..., :1])
    if axis_name is None:
        return last
    size = jax.lax.axis_size(axis_name)
    if size == 1:
        return last
    # Segment i + 1 sends its first reset to segment i; the last segment receives nothing
    # (ppermute gives it zeros), so it takes True.
    following = jax.lax.ppermute(resets[..., :1], axis_name, [(i + 1, i) for i in range(size - 1)])
    return jnp.where(jax.lax.axis_index(axis_name) == size - 1, last, following)


class LRU(nnx.Module):
    """One LRU layer: (b, l, h) -> (b, l, h).

    Args:
      d_model: h, the width of inputs and outputs.
      d_state: n, the number of complex state channels.
      r_min, r_max: the ring |λ| is initialised on (paper Table 8/9).
      max_phase: the largest initial phase of λ.
      bidirectional: add a second LRU, with its own parameters under `reverse`, run from
        the end of the sequence; its output is added (used for Pathfinder / Path-X).
      scan_method, chunk_size: how the recurrence is computed (`lrulm.scan`).
      use_d: include the skip term D ⊙ u (the reverse half of a bidirectional layer
        does not, so the skip is counted once).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        *,
        r_min: float = 0.0,
        r_max: float = 0.99,
        max_phase: float = 2 * math.pi,
        bidirectional: bool = False,
        scan_method: str = "auto",
        chunk_size: int = scan_lib.DEFAULT_CHUNK_SIZE,
        use_d: bool = True,
        rngs: nnx.Rngs,
    ):
        if d_model < 1 or d_state < 1:
            raise ValueError(f"d_model and d_state must be positive; got {d_model}, {d_state}")
        check_ring(r_min, r_max, max_phase)
        scan_lib.resolve(scan_method)  # fail now on an unknown name, not at first call
        self.d_model, self.d_state = d_model, d_state
        self.scan_method, self.chunk_size = scan_method, chunk_size
        self.bidirectional = bidirectional
        h, n = d_model, d_state
        nu_log, theta_log = ring_init(rngs.params(), n, r_min, r_max, max_phase)
        lam_abs = jnp.exp(-jnp.exp(nu_log))
        self.nu_log = param(nu_log, ("state",))
        self.theta_log = param(theta_log, ("state",))
        # γ normalisation: unit-variance state for white-noise input, initialised from Λ.
        self.gamma_log = param(jnp.log(jnp.sqrt(1.0 - lam_abs**2)), ("state",))
        normal = lambda shape, std: std * jax.random.normal(rngs.params(), shape, jnp.float32)
        self.B_re = param(normal((n, h), 1 / math.sqrt(2 * h)), ("state", "embed"))
        self.B_im = param(normal((n, h), 1 / math.sqrt(2 * h)), ("state", "embed"))
        self.C_re = param(normal((h, n), 1 / math.sqrt(n)), ("embed", "state"))
        self.C_im = param(normal((h, n), 1 / math.sqrt(n)), ("embed", "state"))
        self.D = param(normal((h,), 1.0), ("embed",)) if use_d else None
        self.reverse = nnx.data(None)
        if bidirectional:
            self.reverse = LRU(
                d_model,
                d_state,
                r_min=r_min,
                r_max=r_max,
                max_phase=max_phase,
                scan_method=scan_method,
                chunk_size=chunk_size,
                use_d=False,
                rngs=rngs,
            )

    # -- pieces shared by the parallel and the step-by-step forms ----------------------

    def diag_lambda(self) -> jax.Array:
        """Λ as a complex64 vector of shape (n,)."""
        return jax.lax.complex(*self._lambda_parts())

    def _lambda_parts(self) -> tuple[jax.Array, jax.Array]:
        """Λ's real and imaginary parts, float32 (n,) each."""
        # exp(-exp(ν)) rounds to 1.0 in float32 once exp(ν) < ~2**-25 (ν_log < ~-17.3),
        # and a mode with |λ| = 1 never forgets: the decay rate is kept at least 2**-23
        # (|λ| <= 1 - 2**-23, a memory of ~8M steps), a floor no ring init reaches.
        magnitude = jnp.exp(-jnp.maximum(jnp.exp(self.nu_log[...]), _MIN_DECAY_RATE))
        phase = jnp.exp(self.theta_log[...])
        return magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)

    # Complex activations are kept as (real, imag) float32 pairs from the B projection to
    # the C readout: the projections produce and consume the parts anyway, the Pallas
    # kernels work on parts, and the scan's gradient saves the parts of x, which the
    # readout's gradient reuses (one (b, l, n) complex-sized residual per layer).

    def _input(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """exp(γ_log) ⊙ (B u): (..., h) real -> the (..., n) real and imaginary parts."""
        gamma = jnp.exp(self.gamma_log[...])[:, None]
        u = u.astype(jnp.float32)
        bu_re = jnp.einsum("...h,nh->...n", u, self.B_re[...] * gamma)
        bu_im = jnp.einsum("...h,nh->...n", u, self.B_im[...] * gamma)
        return bu_re, bu_im

    def _output(self, x: tuple[jax.Array, jax.Array], u: jax.Array) -> jax.Array:
        """Re(C x) + D ⊙ u: the (..., n) parts of x -> (..., h) float32."""
        y = jnp.einsum("...n,hn->...h", x[0], self.C_re[...])
        y = y - jnp.einsum("...n,hn->...h", x[1], self.C_im[...])
        if self.D is not None:
            y = y + self.D[...] * u.astype(jnp.float32)
        return y

    def _scan(self, bu, resets, h0, reverse, axis_name):
        """The recurrence on parts: bu and h0 are (real, imag) pairs, so is the result."""
        a = self._lambda_parts()
        mesh = sharding.current_mesh()
        if axis_name is None and mesh is not None and mesh.shape["sequence"] > 1:
            # Activations are split along the sequence: scan each segment on its device
            # and pass only the segment-end states between devices.
            return sequence_parallel.scan_over_mesh_parts(
                a,
                bu,
                h0=h0,
                resets=resets,
                reverse=reverse,
                mesh=mesh,
                method=self.scan_method,
                chunk_size=self.chunk_size,
                overwrite_b=True,
            )
        return scan_lib.linear_scan_planar(
            a,
            bu,
            h0=h0,
            resets=resets,  # a document starts at t: forget the state carried into t
            reverse=reverse,
            method=self.scan_method,
            chunk_size=self.chunk_size,
            axis_name=axis_name,
            overwrite_b=True,  # b = B u is read by the scan only
        )

    # -- public forms ------------------------------------------------------------------

    def __call__(
        self,
        u: jax.Array,
        *,
        resets: jax.Array | None = None,
        h0: jax.Array | None = None,
        return_state: bool = False,
        axis_name: str | None = None,
    ):
        """Runs the layer over whole sequences.

        Args:
          u: (b, l, h) inputs, any float dtype.
          resets: optional (b, l) bool, True where a new document starts: the state is
            zeroed before that position.
          h0: optional (b, n) complex initial state (forward direction only).
          return_state: also return the state after the last position, (b, n).
          axis_name: the mesh axis the sequence is split over, inside shard_map.

        Returns:
          y of shape (b, l, h) in u's dtype, and the final state if return_state.
        """
        if u.shape[-1] != self.d_model:
            raise ValueError(f"LRU expects inputs of width {self.d_model}; got shape {u.shape}")
        if h0 is not None:
            h0 = (jnp.real(h0).astype(jnp.float32), jnp.imag(h0).astype(jnp.float32))
        x = self._scan(self._input(u), resets, h0, False, axis_name)
        y = self._output(x, u)
        if self.reverse is not None:
            if return_state or h0 is not None:
                raise ValueError("a bidirectional LRU has no causal state to start or return")
            rev_resets = None
            if resets is not None:  # going backwards, a document ends where the next starts
                rev_resets = jnp.concatenate(
                    [resets[..., 1:], _next_segment_starts(resets, axis_name)], axis=-1
                )
            xr = self.reverse._scan(self.reverse._input(u), rev_resets, None, True, axis_name)
            y = y + self.reverse._output(xr, u)
        y = y.astype(u.dtype)
        return (y, jax.lax.complex(x[0][..., -1, :], x[1][..., -1, :])) if return_state else y

    def step(self, u_t: jax.Array, state: jax.Array):
        """One step of the recurrence, O(n) work: (b, h), (b, n) -> (b, h), (b, n)."""
        if self.reverse is not None:
            raise ValueError("a bidirectional LRU cannot be run step by step")
        x = self.diag_lambda() * state + jax.lax.complex(*self._input(u_t))
        return self._output((x.real, x.imag), u_t).astype(u_t.dtype), x

    def init_state(self, batch_size: int) -> jax.Array:
        return jnp.zeros((batch_size, self.d_state), jnp.complex64)
