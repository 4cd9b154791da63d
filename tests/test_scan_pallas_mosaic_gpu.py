"""The Mosaic GPU kernels (lrulm.kernels.mosaic_gpu, `mosaic,...` tunings): values and
gradients against the sequential scan in Pallas's Mosaic GPU interpreter (with its race
detector), their TMA ring, and their lowering for CUDA on this host (what an H100 gets).
Interpreted on CPU; compiled with LRULM_TEST_PALLAS_COMPILED=1 on a GPU (tools/gpu_check.sh,
its first test step). The gpu_tuning and mosaic_calls fixtures are in conftest.py."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_scan_pallas as base

from lrulm import scan as scan_lib
from lrulm import scan_pallas
from lrulm.kernels import mosaic_gpu as mosaic_kernels

COMPILED = base.COMPILED


# 45 steps = one 32-step chunk and a 13-step tail (one slot: no ring); 100 steps of 16
# through a ring of 2 = 6 chunks (each slot refilled twice) and a 4-step tail; 64 steps
# = whole chunks only; 256 channels are two programs a row. With resets the chunk is a
# whole number of 128-byte keep copies: 32 float32 steps (at 100 steps: 3 chunks, one
# refill), 64 bfloat16 ones (one chunk and a 36-step tail). A full a is one more stream
# of the ring, in either direction.
@pytest.mark.skipif(COMPILED and jax.default_backend() != "gpu", reason="the GPU kernel")
@pytest.mark.parametrize(
    "gpu_tuning, rows, length, complex_, full_a, reverse, bf16_resets",
    [
        ("mosaic,32,2", 2, 45, True, False, True, False),
        ("mosaic,16,2", 1, 100, False, False, False, True),
        ("mosaic,32,2", 1, 64, True, False, False, True),
        ("mosaic,16,2", 2, 100, True, True, True, True),
        ("mosaic,16,3", 1, 100, False, True, False, False),
        # Two thread groups of 64 channels (4 programs a row), each scanning half of
        # every chunk: 2 chunks of 16 and an odd tail (7 + 6 steps), walked either way;
        # 3 chunks and a one-step tail (its second half empty); bf16 chunks of 64.
        ("mosaic,16,2,halves=2", 2, 45, True, False, True, True),
        ("mosaic,16,3,halves=2", 1, 49, True, True, False, False),
        ("mosaic,16,2,halves=2", 1, 45, False, True, True, False),
        ("mosaic,32,2,halves=2", 1, 64, True, False, False, True),
    ],
    indirect=["gpu_tuning"],
)
def test_mosaic_kernels_agree(
    gpu_tuning, rows, length, complex_, full_a, reverse, bf16_resets, mosaic_calls
):
    """The Mosaic GPU kernels (lrulm.kernels.mosaic_gpu, in Pallas's Mosaic GPU
    interpreter on CPU): the forward with resets and h0, and the fused backward in float32
    and bfloat16, against the sequential scan, for an (N,) a and a full one. Two rows
    (programs indexed by row too) where it matters most; one elsewhere, as each program
    costs the interpreter ~4 s."""
    case = ((rows,), length, 256, complex_, full_a, reverse)
    base.test_kernel_keep_mask("gpu", *case, True)
    base.test_backward_kernel("gpu", *case, True, jnp.float32)
    base.test_backward_kernel("gpu", *case, bf16_resets, jnp.bfloat16)
    assert mosaic_calls == ["forward", "backward", "backward"]


@pytest.mark.skipif(COMPILED and jax.default_backend() != "gpu", reason="the GPU kernel")
@pytest.mark.parametrize("halves", [1, 2])
def test_mosaic_ring_copy_is_exact(halves):
    """The ring without the scan (what tools/gpu_kernel_sweep.py times beside the
    forward) returns its input: 101 steps of 16 through 2 slots (refills, a tail), two
    programs a row (four of 64 channels with halves=2, the tail in halves of 3 and 2)."""
    x = tuple(jax.random.normal(jax.random.key(i), (2, 101, 256)) for i in range(2))
    copy = functools.partial(
        mosaic_kernels.ring_copy, chunk=16, stages=2, interpret=not COMPILED, halves=halves
    )
    for got, want in zip(jax.jit(copy)(x), x):
        np.testing.assert_array_equal(got, want)


def test_mosaic_ring_fits_shared_memory():
    """The ring (chunk x slots of every stream, outputs written in place) is cut to fit
    the SMEM budget, keeping two slots (one scanned, one filling) before shortening the
    chunk, and a chunk is a whole number of 128-byte keep copies when there are resets."""
    shape = mosaic_kernels._shape
    ring = lambda chunk, stages, streams, itemsize: (
        chunk * stages * streams * mosaic_kernels.CHANNELS * itemsize
    )
    assert shape(2048, 32, 6, 2, 4, 0) == (32, 6)  # complex forward: 192 KiB
    assert shape(2048, 32, 6, 4, 4, 0) == (32, 3)  # complex backward (dh, h): 192 KiB
    assert shape(2048, 64, 3, 4, 4, 1) == (32, 2)  # two slots kept, the chunk halved
    assert shape(2048, 16, 6, 4, 2, 1) == (64, 3)  # bf16 keep copies: 64 steps at least
    assert shape(45, 32, 4, 2, 4, 0) == (32, 1)  # one whole chunk: one slot, no ring
    assert shape(2048, 32, 12, 2, 4, 0, 2) == (32, 12)  # 64-channel slots: half the bytes
    assert shape(2048, 256, 3, 2, 4, 0, 2) == (64, 3)  # halves hold their steps in registers
    for length in (1, 45, 100, 2048, 65536):
        for chunk in (8, 16, 32, 64, 256):
            for stages in (1, 2, 3, 6, 12):
                for streams, itemsize, keep in ((2, 4, 1), (4, 4, 1), (4, 2, 1), (1, 4, 0)):
                    for halves in (1, 2):
                        c, s = shape(length, chunk, stages, streams, itemsize, keep, halves)
                        assert ring(c, s, streams, itemsize) <= halves * mosaic_kernels._SMEM_BYTES
                        assert s >= 2 or length // c <= 1, (length, chunk, stages, c, s)
                        assert s <= max(1, length // c) and c % halves == 0
                        assert not keep or (c * itemsize) % mosaic_kernels._COPY_ALIGN == 0


@pytest.mark.skipif(COMPILED, reason="lowers for CUDA from the host")
@pytest.mark.parametrize("halves, most", [(1, 6), (2, 8)])
def test_mosaic_kernels_synchronise_per_chunk_not_per_step(halves, most, monkeypatch):
    """The forward's warpgroup barriers (bar.sync) are those of its ring, a few per chunk,
    not Pallas's automatic two around every SMEM store (4 a step for complex values, 147
    for a 32-step chunk before they were turned off); halves=2 adds the exchange's."""
    from jax.experimental.mosaic import gpu as mgpu

    emitted = []
    barrier = mgpu.utils.warpgroup_barrier
    counting = lambda: emitted.append(1) or barrier()
    monkeypatch.setattr(mgpu.utils, "warpgroup_barrier", counting)
    monkeypatch.setattr(mgpu, "warpgroup_barrier", counting)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    forward = functools.partial(
        mosaic_kernels.forward, chunk=32, stages=3, reverse=False, interpret=False, halves=halves
    )
    jax.export.export(jax.jit(forward), platforms=["cuda"])(
        (f32(1024),) * 2, (f32(8, 2048, 1024),) * 2, (f32(8, 1024),) * 2, (f32(8, 2048),)
    )
    assert 0 < len(emitted) <= most, len(emitted)


def test_mosaic_kernels_refuse_a_gpu_older_than_hopper(monkeypatch):
    """Mosaic GPU needs sm_90: an A100 (or a ROCm GPU) gets a clear error before lowering,
    as does a jax that cannot import Mosaic GPU (even for the interpreter: devices [])."""

    class Device:
        def __init__(self, platform, kind, capability):
            self.platform, self.device_kind, self.compute_capability = platform, kind, capability

    mosaic_kernels.check_device([Device("gpu", "NVIDIA H100", "9.0"), Device("cpu", "cpu", "")])
    for device in (Device("gpu", "NVIDIA A100", "8.0"), Device("gpu", "AMD MI300X", "")):
        with pytest.raises(ValueError, match="Hopper.*Triton tuning"):
            mosaic_kernels.check_device([device])
    monkeypatch.setattr(mosaic_kernels, "plgpu", None)
    monkeypatch.setattr(
        mosaic_kernels, "_IMPORT_ERROR", ImportError("no mosaic_gpu"), raising=False
    )
    with pytest.raises(ValueError, match="cannot import them .no mosaic_gpu.*Triton tuning"):
        mosaic_kernels.check_device([])


# Compiled, this would spend gpu_check.sh's Mosaic GPU step on Triton compiles (the
# Triton kernels' compiled tests are its last step).
@pytest.mark.skipif(COMPILED, reason="the dispatch, not a kernel")
@pytest.mark.parametrize("gpu_tuning", ["mosaic,32,2"], indirect=True)
def test_mosaic_falls_back_to_triton_for_what_it_does_not_take(gpu_tuning, mosaic_calls):
    """Channels that are no multiple of 128 go to the Triton kernel, a full a or not."""
    base.test_kernel_keep_mask("gpu", (2,), 21, 40, True, False, False, True)
    base.test_kernel_keep_mask("gpu", (2,), 21, 192, False, True, False, True)
    assert mosaic_calls == []


@pytest.mark.skipif(COMPILED and jax.default_backend() != "gpu", reason="the GPU kernel")
@pytest.mark.parametrize("gpu_tuning", ["mosaic,16,2,halves=2"], indirect=True)
def test_mosaic_halves_take_channels_in_64s(gpu_tuning, mosaic_calls):
    """With halves=2 a program has 64 channels, so N = 192 (LRA Text's) runs on the
    Mosaic GPU kernels too: 3 programs a row, forward and backward, a tail of 5."""
    case = ((2,), 37, 192, True, False, True)
    base.test_kernel_keep_mask("gpu", *case, True)
    base.test_backward_kernel("gpu", *case, True, jnp.float32)
    assert mosaic_calls == ["forward", "backward"]


@pytest.mark.skipif(COMPILED, reason="the interpreter's race detector")
@pytest.mark.parametrize(
    "complex_, full_a, halves",
    [(False, False, 1), (True, False, 1), (True, True, 1), (True, False, 2)],
)
def test_mosaic_kernels_have_no_races(complex_, full_a, halves, monkeypatch):
    """The Mosaic GPU interpreter's happens-before race detector over the TMA ring: every
    slot is read only after its copy arrived (a missing barrier wait fails here), for the
    forward (h over b) and the backward (g over dh) with resets: 6 chunks through a ring
    of 3 (every slot refilled once its copy out has left SMEM) and a tail; a full a is
    one more stream; with halves=2 each chunk's two halves are scanned by two thread
    groups that exchange their end states through SMEM."""
    races = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    monkeypatch.setattr(
        mosaic_kernels, "_interpret_params", lambda: params.InterpretGPUParams(detect_races=True)
    )
    a, b, h0 = base._inputs(3, (1,), 200, 128, complex_=complex_, full_a=full_a)
    keep = ((~base._resets(3, (1, 200))).astype(jnp.float32),)
    a, b, h0 = base._parts(a), base._parts(b), base._parts(h0)
    run = dict(chunk=32, stages=3, reverse=False, interpret=True, halves=halves)
    h = jax.block_until_ready(mosaic_kernels.forward(a, b, h0, keep, **run, over_b=True))
    assert not races.get_races().races_found
    jax.block_until_ready(mosaic_kernels.backward(a, b, h, h0, keep, **run))  # g over dh
    assert not races.get_races().races_found


@pytest.mark.skipif(COMPILED, reason="lowers for CUDA from the host")
@pytest.mark.parametrize("gpu_tuning", ["mosaic,64,3", "mosaic,32,6,halves=2"], indirect=True)
@pytest.mark.parametrize("dtype, over_b", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_mosaic_kernels_lower_for_cuda(gpu_tuning, dtype, over_b, mosaic_calls):
    """The LRU's scan and its gradient with resets at the docs/design.md §4 size (8 x 2048 x 1024),
    lowered for CUDA on this host: the Mosaic GPU lowering accepts every copy and layout
    (the interpreter does not check the TMA's size rules), no Triton kernel is left, and
    g is written over dh (operands 2, 3), h over b when asked: one (B, L, N) buffer per
    recurrence, as with Triton."""
    a = (jnp.zeros((1024,), dtype),) * 2
    b = (jax.ShapeDtypeStruct((8, 2048, 1024), dtype),) * 2
    resets = jax.ShapeDtypeStruct((8, 2048), jnp.bool_)

    def loss(a, b, resets):
        h = scan_lib.linear_scan_planar(a, b, resets=resets, method="pallas", overwrite_b=over_b)
        return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in h)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = jax.export.export(grad, platforms=["cuda"])(a, b, resets).mlir_module()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
    assert len(calls) == 2, "a forward and a backward"
    assert "triton" not in text
    assert set(mosaic_calls) == {"forward", "backward"}  # (each traced more than once)
    assert mosaic_kernels.aliasing()  # this jax can; a jax without it gets new buffers
    aliases = lambda call: re.findall(
        r"output_tuple_indices = \[(\d)\], operand_index = (\d+)", call
    )
    written_over = [("0", "2"), ("1", "3")]
    forward, backward = sorted(calls, key=len)  # the backward has more operands
    assert aliases(forward) == (written_over if over_b else [])
    assert aliases(backward) == written_over


@pytest.mark.skipif(COMPILED, reason="lowers for CUDA from the host")
@pytest.mark.parametrize("gpu_tuning", ["mosaic,32,6"], indirect=True)
def test_lru_layer_lowers_mosaic_kernels_for_cuda_as_on_a_gpu_host(
    gpu_tuning, mosaic_calls, monkeypatch
):
    """What bench.py's layer and train rows run on a GPU: an LRU layer's gradient in
    bfloat16 with document resets, on the GPU host's path, lowered for CUDA: one Mosaic
    GPU forward and one backward, no effect."""
    from flax import nnx

    from lrulm.lru import LRU

    monkeypatch.setattr(scan_pallas, "_mosaic_interpreted", lambda *args: False)
    model = LRU(d_model=256, d_state=256, scan_method="pallas", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    u = jax.ShapeDtypeStruct((4, 1024, 256), jnp.bfloat16)
    resets = jax.ShapeDtypeStruct((4, 1024), jnp.bool_)

    def loss(params, u, resets):
        y = nnx.merge(graphdef, params)(u, resets=resets)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    exported = jax.export.export(grad, platforms=["cuda"])(params, u, resets)
    assert not exported.ordered_effects and not exported.unordered_effects
    text = exported.mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2 and "triton" not in text
    assert set(mosaic_calls) == {"forward", "backward"}


@pytest.mark.skipif(COMPILED, reason="lowers for CUDA from the host")
@pytest.mark.parametrize("gpu_tuning", ["mosaic,32,6"], indirect=True)
def test_mosaic_kernels_lower_a_full_a_for_cuda(gpu_tuning, mosaic_calls):
    """A full (input-dependent) complex a at 8 x 2048 x 1024 with resets, lowered for
    CUDA: both kernels are Mosaic GPU calls, the backward reads no h (its da is one XLA
    fusion after it: operands a, dh and keep only) and writes g over dh."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    a, b = (f32(8, 2048, 1024),) * 2, (f32(8, 2048, 1024),) * 2
    resets = jax.ShapeDtypeStruct((8, 2048), jnp.bool_)

    def loss(a, b, resets):
        h = scan_lib.linear_scan_planar(a, b, resets=resets, method="pallas")
        return sum(jnp.sum(x**2) for x in h)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = jax.export.export(grad, platforms=["cuda"])(a, b, resets).mlir_module()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
    assert len(calls) == 2 and "triton" not in text
    assert set(mosaic_calls) == {"forward", "backward"}
    operands = lambda call: call.split("(")[1].split(")")[0].count("%")
    backward, forward = sorted(calls, key=operands)
    assert operands(forward) == 7  # a, b, h0 (2 parts each), keep
    assert operands(backward) == 5  # a, dh (2 parts each), keep
    assert re.findall(r"output_tuple_indices = \[(\d)\], operand_index = (\d+)", backward) == [
        ("0", "2"),
        ("1", "3"),
    ]


@pytest.mark.skipif(COMPILED, reason="lowers for CUDA from the host")
@pytest.mark.parametrize("gpu_tuning", ["mosaic,32,6", "mosaic,32,6,halves=2"], indirect=True)
def test_mosaic_lowering_gives_every_result_a_value(gpu_tuning, mosaic_calls, monkeypatch):
    """jax >= 0.11's Mosaic GPU lowering requires every primitive's lowered result to be
    a value ("Shaped arrays must be represented by ir.Values", first seen on an H100,
    from a run_scoped: a loop carry the walk never changes, such as the backward's keep
    of one without resets or the ring copy's, lowers to the constant that went in).
    This host's jax lets constants through, so each lowering rule's results are checked
    here, lowering for CUDA: the gradients of an (N,) a and of a bfloat16 full a, both
    without resets, and the ring copy."""
    from jax._src.lib.mlir import ir  # jax internals: this check's alone
    from jax._src.pallas.mosaic_gpu import lowering as mosaic_lowering
    from jax.experimental.mosaic import gpu as mgpu

    results, constants = [0], []  # every rule's results counted; those not values
    for rules in mosaic_lowering.mosaic_lowering_rules.values():
        for primitive, rule in list(rules.items()):

            def checked(ctx, *args, _rule=rule, _primitive=primitive, **params):
                out = _rule(ctx, *args, **params)
                outs = out if _primitive.multiple_results else [out]
                results[0] += len(outs)
                values = (ir.Value, mgpu.FragmentedArray)  # a scalar, an array
                constants.extend(
                    (_primitive.name, type(x).__name__) for x in outs if not isinstance(x, values)
                )
                return out

            monkeypatch.setitem(rules, primitive, checked)

    def lower_grad(a, b):
        loss = lambda a, b: sum(
            jnp.sum(x.astype(jnp.float32) ** 2)
            for x in scan_lib.linear_scan_planar(a, b, method="pallas")
        )
        jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=["cuda"])(a, b)

    shape = (8, 2048, 1024)
    b = (jax.ShapeDtypeStruct(shape, jnp.float32),) * 2
    lower_grad((jnp.zeros((1024,)),) * 2, b)
    assert set(mosaic_calls) == {"forward", "backward"}
    mosaic_calls.clear()
    full = (jax.ShapeDtypeStruct(shape, jnp.bfloat16),) * 2
    lower_grad(full, full)
    assert set(mosaic_calls) == {"forward", "backward"}
    ring = functools.partial(
        mosaic_kernels.ring_copy, chunk=32, stages=6, halves=gpu_tuning.halves, interpret=False
    )
    jax.export.export(jax.jit(ring), platforms=["cuda"])(b)
    assert results[0] > 100 and constants == [], constants


@pytest.mark.parametrize("gpu_tuning", ["mosaic,16,2"], indirect=True)
def test_mosaic_keeps_b_that_is_still_needed(gpu_tuning, mosaic_calls):
    """h written over b by the Mosaic GPU forward (2 chunks and a tail): a b the program
    reads afterwards is copied first, so the caller never sees it change."""
    base.test_b_still_needed_after_the_scan_is_not_overwritten("gpu")
    assert mosaic_calls == ["forward"]
