"""The model's shape: a frozen, typed config and the named presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

NORMS = ("rms", "layer", "batch")
GLUS = ("full", "half")
REMAT_POLICIES = ("none", "full", "dots", "lru")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of an LRU stack.

    Attributes:
      vocab_size: v, tokens (language models and token LRA tasks); 0 for pixel inputs.
      d_model: h, the residual width.
      d_state: n, complex state channels per LRU.
      num_layers: k, residual blocks.
      d_ff: f, width of the MLP sub-block after each LRU block; 0 for the paper's block.
      glu: "full" (two Dense) or "half" (one Dense; the paper's Path-X model).
      norm: "rms", "layer" or "batch" (the paper's LRA models use batch norm).
      dropout: rate after the recurrence and after the GLU / MLP.
      dropout_over_length: one dropout mask per example and channel, the same at every
        position (S5 / minimal-LRU: `nn.Dropout(broadcast_dims=[0])` on an (l, h)
        sequence, the LRU paper's LRA runs), instead of one per element.
      r_min, r_max, max_phase: the ring Λ is initialised on (paper Table 8/9).
      bidirectional: each LRU also runs backwards (Pathfinder, Path-X).
      tie_embeddings: the LM head is the transposed embedding.
      dtype: activation dtype; parameters and the recurrence stay float32/complex64.
      scan_method, chunk_size: how the recurrence is computed (lrulm.scan).
      remat: what the backward pass recomputes: "none"; "full" (save only block
        inputs); "dots" (save matmul outputs); "lru" (save the LRU outputs only).
      scan_layers: stack blocks with a scan over depth (compile time independent of k).
        Unrolled (False), each block is rematerialised on its own; XLA's CPU compiler
        then schedules the recomputation early and saves no memory (2026-12-04; the scan
        form saves it on every backend).
    """

    vocab_size: int = 2048
    d_model: int = 128
    d_state: int = 256
    num_layers: int = 4
    d_ff: int = 0
    glu: str = "full"
    norm: str = "rms"
    dropout: float = 0.0
    dropout_over_length: bool = False
    r_min: float = 0.0
    r_max: float = 0.99
    max_phase: float = 2 * math.pi
    bidirectional: bool = False
    tie_embeddings: bool = True
    dtype: str = "float32"
    scan_method: str = "auto"
    chunk_size: int = 64
    remat: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        for name, value, allowed in [
            ("norm", self.norm, NORMS),
            ("glu", self.glu, GLUS),
            ("remat", self.remat, REMAT_POLICIES),
            ("dtype", self.dtype, DTYPES),
        ]:
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {allowed}")
        for name in ("d_model", "d_state", "num_layers", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive; got {getattr(self, name)}")
        for name in ("d_ff", "vocab_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0; got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout}")
        from lrulm import lru, scan  # jax-heavy: only once a config is made

        lru.check_ring(self.r_min, self.r_max, self.max_phase)
        try:
            scan.resolve(self.scan_method, "cpu")
        except ValueError as e:
            raise ValueError(f"model.scan_method: {e}") from None

    def stack_params(self) -> int:
        """Parameters of the blocks and the final norm (no embedding or head)."""
        h, n, f = self.d_model, self.d_state, self.d_ff
        lru = 4 * n * h + 3 * n + h
        if self.bidirectional:
            lru += 4 * n * h + 3 * n
        glu = (2 if self.glu == "full" else 1) * (h * h + h)
        norm = h if self.norm == "rms" else 2 * h
        mlp = (2 * h * f + f + h + norm) if f else 0
        block = lru + glu + norm + mlp
        return self.num_layers * block + norm  # + final norm

    def num_params(self, *, include_embedding: bool = True) -> int:
        """A language model's parameter count, computed from the shapes (checked against
        the real tree; LRA classifiers: lrulm.lra_task.ClassificationTask.num_params)."""
        h, v = self.d_model, self.vocab_size
        total = self.stack_params()
        if include_embedding:
            total += v * h * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            total += v * h  # the head is a matmul even when the embedding is excluded
        return total

    def flops_per_token(self, seq_len: int, *, lm_head: bool = True) -> float:
        """Training FLOPs per token (forward + backward = 3x forward).

        Matmuls: 2 FLOPs per weight per token (B and C projections count real and
        imaginary parts, and with `lm_head` the head's v*h). The recurrence: ~8 real
        FLOPs per complex multiply-add per channel per token, forward and backward. The
        embedding lookup is free. seq_len is accepted for API symmetry with attention
        models: an LRU's cost per token does not depend on it.
        """
        del seq_len
        h, n, f = self.d_model, self.d_state, self.d_ff
        v = self.vocab_size if lm_head else 0
        dirs = 2 if self.bidirectional else 1
        per_layer = dirs * (4 * n * h * 2 + 8 * n)
        per_layer += (2 if self.glu == "full" else 1) * 2 * h * h
        per_layer += 2 * 2 * h * f
        forward = self.num_layers * per_layer + 2 * v * h
        return 3.0 * forward


# Presets: name -> fields. Sizes are counted with `ModelConfig.num_params`.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    # 2-core CPU: the README's embedded-default run (~0.9M parameters).
    "tiny": dict(vocab_size=2048, d_model=128, d_state=128, num_layers=4, d_ff=256),
    # A unit-test model: compiles in seconds.
    "test": dict(vocab_size=512, d_model=32, d_state=32, num_layers=2, d_ff=64),
    # ~125M (GPT-2 small widths): 12 x 768, one host.
    "125m": dict(
        vocab_size=32768,
        d_model=768,
        d_state=768,
        num_layers=12,
        d_ff=3072,
        tie_embeddings=False,
        dtype="bfloat16",
    ),
    # ~350M: 24 x 1024, one host / small slice.
    "350m": dict(
        vocab_size=32768,
        d_model=1024,
        d_state=768,
        num_layers=24,
        d_ff=4096,
        tie_embeddings=False,
        dtype="bfloat16",
    ),
    # ~1.3B: 24 x 2048, pods (FSDP).
    "1.3b": dict(
        vocab_size=32768,
        d_model=2048,
        d_state=1024,
        num_layers=24,
        d_ff=8192,
        tie_embeddings=False,
        dtype="bfloat16",
        remat="full",
    ),
}


def from_preset(preset: str, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name, with fields overridden (None = keep)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; use one of {sorted(PRESETS)}")
    fields = dict(PRESETS[preset])
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in overrides.items():
        if key not in valid:
            raise ValueError(f"ModelConfig has no field {key!r}")
        if value is not None:
            fields[key] = value
    return ModelConfig(**fields)
