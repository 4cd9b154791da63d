"""The platform traced programs are for: this host's, or the one an ahead-of-time compile
targets (`lrulm compile` for a GPU or TPU this machine lacks).

A few choices are made in Python while tracing, by platform: which scan method "auto"
is, whether a Pallas kernel runs in its interpreter or sharded per device, whether a long
scan is split in time for a GPU. `jax.default_backend()` answers for this host (the CPU
of a laptop compiling for an H100); under `compiling_for("gpu")` these choices are the
GPU's, so the compiled program is the one the GPU would run.
"""

from __future__ import annotations

import contextlib

import jax

_target: str | None = None


def backend() -> str:
    """The platform being traced for: "cpu", "gpu" or "tpu"."""
    return _target or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Traces inside are for `platform` ("gpu" or "tpu"). JAX's and the kernels' cached
    traces are dropped on the way in and out, so that none made for one platform serves
    the other."""
    from lrulm import scan_pallas

    global _target
    old, _target = _target, platform
    switch = backend() != (old or jax.default_backend())
    if switch:
        scan_pallas.forget_traces()
    try:
        yield
    finally:
        _target = old
        if switch:
            scan_pallas.forget_traces()
