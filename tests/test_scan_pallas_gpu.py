"""The GPU kernel's launch shapes (lrulm.kernels.gpu.Tuning, $LRULM_PALLAS_GPU_TUNING)
and its split in time (time_segments), against the sequential scan. Interpreted on CPU;
compiled with LRULM_TEST_PALLAS_COMPILED=1 on a GPU (tools/gpu_check.sh)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_scan_pallas as base

from lrulm import scan as scan_lib
from lrulm import scan_pallas
from lrulm.kernels import gpu as gpu_kernels
from lrulm.scan import linear_scan

COMPILED = base.COMPILED


@pytest.fixture
def gpu_tuning(request):
    """Sets lrulm.kernels.gpu's launch-shape override for one test. The kernels read it
    while tracing, so every cached trace is dropped before and after."""
    old = os.environ.get(gpu_kernels.TUNING_ENV)
    os.environ[gpu_kernels.TUNING_ENV] = request.param
    scan_pallas.forget_traces()
    yield gpu_kernels.tuning()
    if old is None:
        os.environ.pop(gpu_kernels.TUNING_ENV)
    else:
        os.environ[gpu_kernels.TUNING_ENV] = old
    scan_pallas.forget_traces()


# Few loads per thread, so that a 21-step sequence takes several chunks and a tail (the
# prefetching loop, its last chunk after the loop, and the tail); 40 channels leave a
# ragged last block for every width.
@pytest.mark.skipif(COMPILED and jax.default_backend() != "gpu", reason="the GPU kernel")
@pytest.mark.parametrize(
    "gpu_tuning, complex_, full_a, reverse",
    [
        ("32,1,12,prefetch", True, False, True),
        ("32,1,12,prefetch", False, True, False),
        ("64,2,12,stages=3", False, True, True),
        ("16,1,128,prefetch", True, True, False),
        ("128,2,40,prefetch", True, False, False),
    ],
    indirect=["gpu_tuning"],
)
def test_gpu_launch_shapes_agree(gpu_tuning, complex_, full_a, reverse):
    """Every launch shape tools/gpu_kernel_sweep.py may pick computes the same values and
    gradients: the forward with resets and h0, and the fused backward."""
    case = ((2,), 21, 40, complex_, full_a, reverse)
    base.test_kernel_keep_mask("gpu", *case, True)
    base.test_backward_kernel("gpu", *case, True, jnp.float32)


@pytest.mark.skipif(COMPILED and jax.default_backend() != "gpu", reason="the GPU kernel")
@pytest.mark.parametrize("gpu_tuning", ["32,1,12,prefetch,segments=4"], indirect=True)
@pytest.mark.parametrize(
    "complex_, reverse, use_h0", [(True, False, True), (True, True, True), (False, False, False)]
)
def test_time_split_scan_equals_unsplit(gpu_tuning, complex_, reverse, use_h0):
    """The GPU kernel's sequence split in time (lrulm.kernels.gpu.time_segments, forced
    to 4 segments here): values and gradients w.r.t. a, b and h0 against the sequential
    scan, with resets inside segments and on their first and last positions."""
    lead, length, n = (2,), 64, 40
    a, b, h0 = base._inputs(7, lead, length, n, complex_=complex_, full_a=False)
    h0 = h0 if use_h0 else jnp.zeros_like(h0)
    resets = np.zeros(lead + (length,), bool)
    resets[0, [5, 16, 31, 47, 48]] = True
    resets[1, [15, 32, 33]] = True
    resets = jnp.asarray(resets)
    w = jnp.linspace(-1.0, 2.0, n)
    parts = (*base._parts(a), *base._parts(b), *base._parts(h0))
    k = len(base._parts(a))

    def loss(*xs, split):
        a, b, h0 = xs[:k], xs[k : 2 * k], xs[2 * k :]
        if split:
            h = scan_lib.linear_scan_planar(
                a, b, h0=h0, resets=resets, reverse=reverse, method="pallas"
            )
        else:
            gated = jnp.where(resets[..., None], 0, jnp.broadcast_to(base._whole(a), b[0].shape))
            h = base._parts(linear_scan(
                gated, base._whole(b), h0=base._whole(h0), reverse=reverse, method="sequential",
                grad="autodiff",
            ))  # fmt: skip
        return jnp.sum(h[0] * w) + sum(jnp.sum(x**2) for x in h)

    assert gpu_kernels.time_segments(2, length, n, backend="cpu") == 4
    jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, split=True)))(*parts))
    assert "f32[2,4,16,40]" in jaxpr  # the kernels see 4 segments of 16 as rows
    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(3 * k))), static_argnames="split")
    (ref, g_ref), (out, g) = grad(*parts, split=False), grad(*parts, split=True)
    assert abs(out - ref) <= 1e-5 * abs(ref)
    for i, (x, y) in enumerate(zip(g, g_ref)):
        assert base._rel(x, y) <= 1e-5, (i, base._rel(x, y))
    if complex_ and reverse:  # the complex linear_scan's Pallas path: 1000 = 4 x 250
        base.test_linear_scan_gradients(*base.CASES[3])


def test_time_segments_only_split_launches_with_too_few_programs():
    segments = functools.partial(gpu_kernels.time_segments, backend="gpu", sms=132)
    assert segments(8, 2048, 1024) == 1  # 256 programs: measured unsplit
    assert segments(1, 65536, 768) == 16  # 24 programs -> 384
    assert segments(1, 2048, 1024) == 2  # 32 programs, but segments of >= 1024 steps
    assert segments(1, 1000, 1024) == 1  # no power of two divides into >= 1024 steps
    assert gpu_kernels.time_segments(1, 65536, 768, backend="tpu") == 1


def test_gpu_tuning_parses_and_rejects_bad_text():
    parse = gpu_kernels.Tuning.parse
    assert parse("64,2,128") == gpu_kernels.Tuning(64, 2, 128, False, 1)
    assert parse("32,1,64,prefetch") == gpu_kernels.Tuning(32, 1, 64, True, 1)
    assert parse("32,1,64,stages=3") == gpu_kernels.Tuning(32, 1, 64, False, 3)
    assert parse("32,1,64,segments=8").segments == 8
    for text in ("32,1,64,prefetch", "32,1,64,prefetch,stages=2,segments=4", "16,1,8"):
        assert str(parse(text)) == text
    assert str(gpu_kernels.Tuning()) == "32,1,128,prefetch"  # the measured default
    wrong = ("32,1", "32,1,x", "32,1,64,fast", "48,1,64", "32,0,64", "32,1,64,stages=0",
             "32,1,64,segments=", "32,1,64,segments=-2")  # fmt: skip
    for bad in wrong:
        with pytest.raises(ValueError, match=gpu_kernels.TUNING_ENV):
            parse(bad)
