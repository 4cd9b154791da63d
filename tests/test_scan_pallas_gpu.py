"""The GPU kernels' launch shapes (lrulm.kernels.gpu.Tuning, $LRULM_PALLAS_GPU_TUNING)
and their split in time (time_segments), against the sequential scan; the Mosaic GPU
kernels' own tests are in test_scan_pallas_mosaic_gpu.py. Interpreted on CPU; compiled
with LRULM_TEST_PALLAS_COMPILED=1 on a GPU (tools/gpu_check.sh). The gpu_tuning and
mosaic_calls fixtures are in conftest.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_scan_pallas as base

from lrulm import scan as scan_lib
from lrulm import scan_pallas
from lrulm.kernels import gpu as gpu_kernels
from lrulm.kernels import mosaic_gpu as mosaic_kernels
from lrulm.scan import linear_scan

COMPILED = base.COMPILED


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
        ("32,1,12,prefetch,bwd=40", True, True, True),  # the backward's own chunk
        # Two chunks a loop iteration, with resets: forward 10 chunks of 2 steps (two left
        # after the loop), backward 21 of 1 (complex) and 7 of 3 (real, full a): one left.
        ("32,1,12,pingpong", True, False, True),
        ("32,1,12,pingpong,bwd=24", False, True, False),
    ],
    indirect=["gpu_tuning"],
)
def test_gpu_launch_shapes_agree(gpu_tuning, complex_, full_a, reverse):
    """Every launch shape tools/gpu_kernel_sweep.py may pick computes the same values and
    gradients: the forward with resets and h0, and the fused backward."""
    case = ((2,), 21, 40, complex_, full_a, reverse)
    base.test_kernel_keep_mask("gpu", *case, True)
    base.test_backward_kernel("gpu", *case, True, jnp.float32)


# 0 to 5 whole chunks of 3 steps, with and without a tail: the pingpong loop (prefetch
# 2) walks chunks in pairs, then one or two chunks after it.
@pytest.mark.parametrize("length", [1, 2, 3, 5, 6, 9, 12, 13, 16, 17])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_chunk_walk_scans_every_row_once_in_order_with_its_own_loads(length, reverse, prefetch):
    """The GPU kernels' time loop (lrulm.kernels.gpu._walk_chunks): every row scanned
    once, in walk order, each with the values loaded for it."""

    def load(rows):
        return [(jnp.int32(t), 1000 + jnp.int32(t)) for t in rows]

    def scan(carry, rows, loaded):
        order, position, mismatches = carry
        for t, (row, value) in zip(rows, loaded):
            order = order.at[position].set(row)
            mismatches += (row != t) + (value != 1000 + t)
            position += 1
        return order, position, mismatches

    carry = (jnp.full((length,), -1, jnp.int32), jnp.int32(0), jnp.int32(0))
    walk = functools.partial(gpu_kernels._walk_chunks, chunk=3, reverse=reverse, prefetch=prefetch)
    order, position, mismatches = jax.jit(lambda c: walk(load, scan, c, length))(carry)
    expected = np.arange(length)[::-1] if reverse else np.arange(length)
    np.testing.assert_array_equal(order, expected)
    assert int(position) == length and int(mismatches) == 0


@pytest.mark.skipif(COMPILED and jax.default_backend() != "gpu", reason="the GPU kernel")
@pytest.mark.parametrize(
    "gpu_tuning, n, complex_, reverse, use_h0",
    [
        ("32,1,12,prefetch,segments=4", 40, True, False, True),
        ("32,1,12,prefetch,segments=4", 40, True, True, True),
        ("32,1,12,prefetch,segments=4", 40, False, False, False),
        ("mosaic,32,2,segments=4", 128, True, True, True),
    ],
    indirect=["gpu_tuning"],
)
def test_time_split_scan_equals_unsplit(gpu_tuning, n, complex_, reverse, use_h0, mosaic_calls):
    """The GPU kernels' sequence split in time (lrulm.kernels.gpu.time_segments, forced
    to 4 segments here): values and gradients w.r.t. a, b and h0 against the sequential
    scan, with resets inside segments and on their first and last positions."""
    lead, length = (2,), 64
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
    assert f"f32[2,4,16,{n}]" in jaxpr  # the kernels see 4 segments of 16 as rows
    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(3 * k))), static_argnames="split")
    (ref, g_ref), (out, g) = grad(*parts, split=False), grad(*parts, split=True)
    assert abs(out - ref) <= 1e-5 * abs(ref)
    for i, (x, y) in enumerate(zip(g, g_ref)):
        assert base._rel(x, y) <= 1e-5, (i, base._rel(x, y))
    assert bool(mosaic_calls) == (gpu_tuning.kernel == "mosaic")
    if complex_ and reverse and n == 40:  # the complex linear_scan's Pallas path: 1000 = 4 x 250
        base.test_linear_scan_gradients(*base.CASES[3])


@pytest.mark.skipif(COMPILED, reason="lowers for CUDA from the host")
@pytest.mark.parametrize(
    "gpu_tuning",
    ["mosaic,32,6", "mosaic,32,6,halves=2,segments=2", "32,1,128,prefetch", "32,1,128,segments=4"],
    indirect=True,
)
def test_kernels_lower_for_cuda_partitioned_as_on_a_gpu_host(gpu_tuning, mosaic_calls, monkeypatch):
    """On a GPU host the call goes through custom_partitioning, whose lowering threads no
    effect tokens, with platform_dependent's CPU branch traced too. That branch used to
    interpret a Mosaic GPU tuning with Pallas's Mosaic GPU interpreter, whose ordered I/O
    effect then failed every Mosaic GPU lowering on an H100 (KeyError: OrderedIOEffect).
    Here the GPU host's path (not _mosaic_interpreted), lowered for CUDA: the kernels
    the tuning names, and no effect in the exported program."""
    monkeypatch.setattr(scan_pallas, "_mosaic_interpreted", lambda *args: False)
    a = (jnp.zeros((1024,), jnp.float32),) * 2
    b = (jax.ShapeDtypeStruct((8, 2048, 1024), jnp.float32),) * 2
    resets = jax.ShapeDtypeStruct((8, 2048), jnp.bool_)

    def loss(a, b, resets):
        h = scan_lib.linear_scan_planar(a, b, resets=resets, method="pallas")
        return sum(jnp.sum(x**2) for x in h)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = jax.export.export(grad, platforms=["cuda"], disabled_checks=[triton])(a, b, resets)
    assert not exported.ordered_effects and not exported.unordered_effects
    text = exported.mlir_module()
    mosaic = text.count("stablehlo.custom_call @mosaic_gpu")
    # Split in time (segments=T): each kernel runs once over T times the rows.
    segments = max(1, gpu_tuning.segments)
    assert f"tensor<{8 * segments}x{2048 // segments}x1024xf32>" in text
    if gpu_tuning.kernel == "mosaic":
        assert mosaic == 2 and "triton" not in text
        assert set(mosaic_calls) == {"forward", "backward"}
    else:
        assert mosaic == 0 and text.count("custom_call @__gpu$xla.gpu.triton") == 2
        assert not mosaic_calls


@pytest.mark.parametrize(
    "gpu_tuning", ["32,1,8", "mosaic,16,2", "mosaic,32,2,halves=2"], indirect=True
)
def test_bfloat16_full_a_gradients_through_linear_scan(gpu_tuning):
    """A bfloat16 full (input-dependent) complex a, as planes, with resets and h0,
    through linear_scan_planar(method="pallas"): every kernel writes a full a's da in
    dh's dtype, so the backends' branches of the dispatch agree (they once did not:
    float32 from the GPU kernels, bfloat16 from the TPU one, and tracing failed), and the
    gradients match the associative scan's on the same rounded inputs, in float32."""
    a, b, h0 = base._inputs(11, (2,), 40, 128, complex_=True, full_a=True)
    parts = lambda x: (x.real.astype(jnp.bfloat16), x.imag.astype(jnp.bfloat16))
    a, b, h0 = parts(a), parts(b), parts(h0)
    resets = base._resets(5, (2, 40))

    def loss(a, b, h0, method):
        h = scan_lib.linear_scan_planar(a, b, h0=h0, resets=resets, method=method)
        w = jnp.linspace(-1.0, 2.0, 128)
        return jnp.sum(w * h[0].astype(jnp.float32)) - jnp.sum(h[1].astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnames="method")
    f32 = lambda x: jax.tree.map(lambda p: p.astype(jnp.float32), x)
    got, want = grad(a, b, h0, "pallas"), grad(f32(a), f32(b), f32(h0), "associative")
    for name, x, y in zip(("a", "b", "h0"), got, want):
        assert {p.dtype for p in x} == {jnp.dtype(jnp.bfloat16)}, name
        err = max(base._rel(p, q) for p, q in zip(x, y))
        assert err <= 2e-2, (name, err)


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
    for text in ("32,1,64,prefetch", "32,1,64,prefetch,stages=2,segments=4", "16,1,8",
                 "32,1,128,prefetch,bwd=192,segments=2"):  # fmt: skip
        assert str(parse(text)) == text
    assert parse("32,1,128,prefetch,bwd=192").backward_load_registers == 192
    # pingpong is a way to prefetch: it implies prefetch, whichever way it is written.
    pingpong = gpu_kernels.Tuning(32, 1, 128, True, pingpong=True)
    assert parse("32,1,128,pingpong") == parse("32,1,128,prefetch,pingpong") == pingpong
    assert str(pingpong) == "32,1,128,pingpong"
    text = "32,1,128,pingpong,bwd=192,segments=2"
    assert str(parse(text)) == text
    with pytest.raises(ValueError, match="pingpong"):
        gpu_kernels.Tuning(32, 1, 128, False, pingpong=True)
    assert str(gpu_kernels.Tuning()) == "32,1,128,prefetch"  # the measured default
    mosaic = parse("mosaic,64,3,segments=2")
    assert (mosaic.kernel, mosaic.chunk, mosaic.stages, mosaic.segments) == ("mosaic", 64, 3, 2)
    assert mosaic.channels == mosaic_kernels.CHANNELS  # what time_segments counts programs by
    for text in ("mosaic,32,3", "mosaic,64,2,segments=4", "mosaic,32,6,halves=2,segments=1"):
        assert str(parse(text)) == text
    halves = parse("mosaic,32,6,halves=2")  # two thread groups of 64 channels a program
    assert (halves.halves, halves.channels) == (2, mosaic_kernels.CHANNELS // 2)
    # What Mosaic GPU leaves to Triton runs with Triton's default launch shape.
    assert str(mosaic.triton()) == "32,1,128,prefetch,segments=2"
    assert parse("16,1,8").triton() == parse("16,1,8")
    wrong = ("32,1", "32,1,x", "32,1,64,fast", "48,1,64", "32,0,64", "32,1,64,stages=0",
             "32,1,64,segments=", "32,1,64,segments=-2", "mosaic,32", "mosaic,0,2",
             "mosaic,32,2,prefetch", "triton,32,1,64", "mosaic,32,2,halves=3",
             "32,1,64,halves=2", "32,1,64,bwd=-1", "32,1,64,bwd=",
             "mosaic,32,2,bwd=64", "mosaic,32,2,pingpong", "32,1,64,pingpong=1")  # fmt: skip
    for bad in wrong:
        with pytest.raises(ValueError, match=gpu_kernels.TUNING_ENV):
            parse(bad)


@pytest.mark.parametrize("gpu_tuning", ["32,1,128,prefetch,bwd=192"], indirect=True)
def test_backward_load_registers_set_the_backward_chunk_only(gpu_tuning):
    """bwd=R: the backward (dh and h: 4 values a step for complex parts) loads R
    registers' worth a thread, the forward (b: 2) keeps LOAD_REGISTERS. With prefetch
    each holds two chunks: 128 // (2 * 2) = 32 steps forward, 192 // (4 * 2) = 24 back."""
    chunk = lambda per_row, backward: gpu_kernels._launch(1024, 2048, per_row, 64, backward)[2]
    assert (chunk(2, False), chunk(4, True), chunk(4, False)) == (32, 24, 16)
