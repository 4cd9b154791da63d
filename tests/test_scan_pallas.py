"""The Pallas recurrence kernels (interpreted on CPU) against the sequential reference.

On a machine with a GPU or TPU, `LRULM_TEST_PALLAS_COMPILED=1 JAX_PLATFORMS=cuda pytest
tests/test_scan_pallas.py` runs the same checks on the compiled kernel (tools/gpu_check.sh).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrulm import compile as compile_lib
from lrulm import scan as scan_lib
from lrulm import scan_pallas
from lrulm.kernels import tpu as tpu_kernels
from lrulm.scan import linear_scan

COMPILED = os.environ.get("LRULM_TEST_PALLAS_COMPILED", "") not in ("", "0")
# Interpreted on CPU, both kernel variants are checked; compiled, the device's own one.
if COMPILED:
    KERNELS = ["tpu" if jax.default_backend() == "tpu" else "gpu"]
else:
    KERNELS = ["gpu", "tpu"]
_STATIC = ("method", "grad", "reverse", "chunk_size")
_scan_jit = jax.jit(linear_scan, static_argnames=_STATIC)
_kernel_jit = jax.jit(
    scan_pallas.forward, static_argnames=("chunk_size", "reverse", "interpret", "kernel")
)


@pytest.fixture(scope="module", autouse=True)
def _backend_matches_mode():
    if COMPILED:
        assert jax.default_backend() in ("gpu", "tpu"), (
            "LRULM_TEST_PALLAS_COMPILED=1 needs a GPU or TPU backend (set JAX_PLATFORMS=cuda); "
            f"got {jax.default_backend()!r}"
        )


def _inputs(seed, lead, length, n, *, complex_, full_a):
    rng = np.random.default_rng(seed)
    shape = lead + (length, n)
    mag = rng.uniform(0.5, 0.999, shape if full_a else (n,))
    if complex_:
        a = mag * np.exp(1j * rng.uniform(0, 2 * np.pi, mag.shape))
        b = rng.normal(size=shape) + 1j * rng.normal(size=shape)
        h0 = rng.normal(size=lead + (n,)) + 1j * rng.normal(size=lead + (n,))
        dtype = np.complex64
    else:
        a, b, h0 = mag, rng.normal(size=shape), rng.normal(size=lead + (n,))
        dtype = np.float32
    return tuple(jnp.asarray(x.astype(dtype)) for x in (a, b, h0))


def _rel(x, y):
    x, y = jnp.asarray(x, jnp.complex64), jnp.asarray(y, jnp.complex64)
    return float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))


def _loss(a, b, h0, **kw):
    h = linear_scan(a, b, h0=h0, **kw)
    # A real loss that touches real and imaginary parts differently.
    w = jnp.linspace(-1.0, 2.0, h.shape[-1])
    return jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) ** 2) + jnp.sum(jnp.abs(h) ** 2)


def _cuda_text(f, *args) -> str:
    """f's StableHLO lowered for CUDA on a machine without a GPU. Newer JAX reads the
    Triton target from the local device (jax._src.pallas.triton.gpu_info); there, this
    host's device kind is registered as an H100 while lowering."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:  # older JAX: the lowering needs no device
        gpu_info = None
    kind = jax.devices()[0].device_kind
    registry = getattr(gpu_info, "registry", None)
    if registry is not None:
        registry[kind] = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    try:
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        if registry is not None:
            registry.pop(kind, None)


_grad_jit = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnames=_STATIC)

# (leading axes, L, N, complex, a full, reverse, h0). N=5 leaves the GPU kernel a ragged
# channel block; N=256 gives the TPU kernel its (groups, 128 lanes) layout. Lengths 7 and
# 1000 are not multiples of the chunk.
CASES = [
    ((), 1, 5, True, False, False, True),
    ((2,), 7, 5, False, True, True, True),
    ((2, 3), 7, 256, True, True, False, False),
    ((2,), 1000, 5, True, False, True, True),
    ((), 1000, 256, False, True, False, True),
    ((1, 2), 1000, 5, True, True, True, False),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lead, length, n, complex_, full_a, reverse, use_h0", CASES)
def test_kernel_values(kernel, lead, length, n, complex_, full_a, reverse, use_h0):
    a, b, h0 = _inputs(length + n, lead, length, n, complex_=complex_, full_a=full_a)
    h0 = h0 if use_h0 else None
    ref = _scan_jit(a, b, h0=h0, reverse=reverse, method="sequential")
    out = _kernel_jit(a, b, h0, reverse=reverse, interpret=not COMPILED, kernel=kernel)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("lead, length, n, complex_, full_a, reverse, use_h0", CASES[1:5])
def test_linear_scan_gradients(lead, length, n, complex_, full_a, reverse, use_h0):
    """method="pallas" through linear_scan: values and gradients w.r.t. a, b and h0."""
    a, b, h0 = _inputs(length * n, lead, length, n, complex_=complex_, full_a=full_a)
    h0 = h0 if use_h0 else jnp.zeros_like(h0)
    kw = dict(reverse=reverse)
    ref = _scan_jit(a, b, h0=h0, method="sequential", grad="autodiff", **kw)
    out = _scan_jit(a, b, h0=h0, method="pallas", **kw)
    assert out.dtype == ref.dtype and _rel(out, ref) <= 1e-5
    g_ref = _grad_jit(a, b, h0, method="sequential", grad="autodiff", **kw)
    g = _grad_jit(a, b, h0, method="pallas", grad="recurrence", **kw)
    for name, x, y in zip(("a", "b", "h0"), g, g_ref):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert _rel(x, y) <= 1e-5, (name, _rel(x, y))


def _resets(seed, shape):
    resets = np.random.default_rng(seed).uniform(size=shape) < 0.1
    resets[..., 0] = resets[..., -1] = True  # where h0 enters, in either direction
    return jnp.asarray(resets)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lead, length, n, complex_, full_a, reverse, use_h0", CASES[1:])
def test_kernel_keep_mask(kernel, lead, length, n, complex_, full_a, reverse, use_h0):
    """forward_parts(keep=...) == the scan with a zeroed where keep is false."""
    a, b, h0 = _inputs(length + n + 1, lead, length, n, complex_=complex_, full_a=full_a)
    h0 = h0 if use_h0 else None
    resets = _resets(length, lead + (length,))
    gated = jnp.where(resets[..., None], 0, jnp.broadcast_to(a, b.shape))
    ref = _scan_jit(gated, b, h0=h0, reverse=reverse, method="sequential")
    parts = scan_pallas._parts
    out = jax.jit(scan_pallas.forward_parts, static_argnames=("reverse", "interpret", "kernel"))(
        parts(a),
        parts(b),
        None if h0 is None else parts(h0),
        keep=~resets,
        reverse=reverse,
        interpret=not COMPILED,
        kernel=kernel,
    )
    out = jax.lax.complex(*out) if complex_ else out[0]
    assert _rel(out, ref) <= 1e-5


def test_tpu_chunks_divide_the_length_or_the_length_is_padded():
    chunk = tpu_kernels.chunking  # (length, chunk, tile rows, VMEM rows) -> (chunk, length)
    assert chunk(2048, 256, 8, 10**6) == (256, 2048)
    assert chunk(2000, 256, 8, 10**6) == (200, 2000)  # 10 steps of 200, no padding
    assert chunk(4072, 256, 8, 10**6) == (256, 4096)  # 8 x 509: padded, not 509 steps of 8
    assert chunk(7, 256, 8, 10**6) == (8, 8)
    assert chunk(2048, 256, 16, 100) == (64, 2048)  # slabs of 16 rows, VMEM-bound
    # 300 rows in slabs of 16 must be padded: to 2 steps of 160, not 2 of 288
    assert chunk(300, 512, 16, 10**6) == (160, 320)


@pytest.mark.skipif(COMPILED and jax.default_backend() != "tpu", reason="the TPU kernel")
@pytest.mark.parametrize("reverse", [False, True])
def test_tpu_kernel_on_a_padded_length(reverse):
    """A length that is no multiple of a slab (300: padded to 320 in 2 steps of 160) gives
    the same h, with resets and h0, in either direction (padding goes where the state
    never flows)."""
    a, b, h0 = _inputs(7, (2,), 300, 256, complex_=True, full_a=False)
    resets = _resets(3, (2, 300))
    gated = jnp.where(resets[..., None], 0, jnp.broadcast_to(a, b.shape))
    ref = _scan_jit(gated, b, h0=h0, reverse=reverse, method="sequential")
    parts = scan_pallas._parts
    run = functools.partial(tpu_kernels.forward, chunk=64, reverse=reverse, interpret=not COMPILED)
    out = jax.jit(run)(parts(a), parts(b), parts(h0), ((~resets).astype(jnp.float32),))
    assert _rel(jax.lax.complex(*out), ref) <= 1e-5


@pytest.mark.parametrize(
    "lead, length, n, full_a, reverse",
    [((2,), 1000, 5, False, True), ((2, 3), 7, 256, True, False)],
)
def test_planar_resets_gradients(lead, length, n, full_a, reverse):
    """linear_scan_planar(method="pallas", resets=...): values and gradients w.r.t. every
    part, against the complex sequential scan with the decays zeroed at the resets."""
    a, b, h0 = _inputs(n + length, lead, length, n, complex_=True, full_a=full_a)
    resets = _resets(n, lead + (length,))
    w = jnp.linspace(-1.0, 2.0, n)

    def loss(a_re, a_im, b_re, b_im, h0_re, h0_im, planar):
        if planar:
            hr, hi = scan_lib.linear_scan_planar(
                (a_re, a_im),
                (b_re, b_im),
                h0=(h0_re, h0_im),
                resets=resets,
                reverse=reverse,
                method="pallas",
            )
        else:
            a = jnp.where(
                resets[..., None], 0, jnp.broadcast_to(jax.lax.complex(a_re, a_im), b.shape)
            )
            h = linear_scan(
                a,
                jax.lax.complex(b_re, b_im),
                h0=jax.lax.complex(h0_re, h0_im),
                reverse=reverse,
                method="sequential",
                grad="autodiff",
            )
            hr, hi = h.real, h.imag
        return jnp.sum(hr * w) + jnp.sum(hi**2) + jnp.sum(hr * hi)

    parts = (a.real, a.imag, b.real, b.imag, h0.real, h0.imag)
    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))), static_argnums=6)
    ref, g_ref = grad(*parts, False)
    out, g = grad(*parts, True)
    assert abs(out - ref) <= 1e-5 * abs(ref)
    for i, (x, y) in enumerate(zip(g, g_ref)):
        assert _rel(x, y) <= 1e-5, (i, _rel(x, y))


def _parts(x):
    return (x.real, x.imag) if jnp.iscomplexobj(x) else (x,)


def _whole(parts):
    return jax.lax.complex(*parts) if len(parts) == 2 else parts[0]


# (leading axes, L, N, complex, a full, reverse, resets, dtype): the TPU kernel's slab edges
# (L = 7, 40, 300: padded, 300 in two chunks; 48 and 40: 3 slabs of 16 in one chunk, so
# the h_{t-1} of a slab comes from the one before it), both directions, both decay forms,
# bf16's 32-row slabs.
BACKWARD_CASES = [
    ((2,), 40, 256, True, False, False, True, jnp.float32),
    ((2,), 40, 256, True, False, True, True, jnp.float32),
    ((), 300, 128, True, True, True, True, jnp.float32),
    ((2,), 7, 5, False, True, False, False, jnp.float32),
    ((1, 2), 300, 256, False, False, False, True, jnp.float32),
    ((2,), 96, 256, True, False, True, True, jnp.bfloat16),
    ((2,), 48, 128, False, False, False, True, jnp.float32),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "lead, length, n, complex_, full_a, reverse, resets, dtype", BACKWARD_CASES
)
def test_backward_kernel(kernel, lead, length, n, complex_, full_a, reverse, resets, dtype):
    """backward_parts (g = the cotangent of b, da of a), each kernel variant on its own,
    against the sequential scan's autodiff with the decays zeroed at the resets."""
    a, b, h0 = _inputs(length + 3 * n, lead, length, n, complex_=complex_, full_a=full_a)
    if dtype == jnp.bfloat16:  # round the inputs, so that both sides see the same values
        rounded = lambda x: _whole(tuple(p.astype(dtype).astype(jnp.float32) for p in _parts(x)))
        a, b, h0 = map(rounded, (a, b, h0))
    keep = ~_resets(n, lead + (length,)) if resets else jnp.ones(lead + (length,), bool)
    dh = _inputs(length + 1, lead, length, n, complex_=complex_, full_a=True)[1]

    def scan(a, b, h0):
        gated = jnp.where(keep[..., None], jnp.broadcast_to(a, b.shape), 0)
        return linear_scan(gated, b, h0=h0, reverse=reverse, method="sequential", grad="autodiff")

    h, vjp = jax.vjp(scan, a, b, h0)
    da_ref, g_ref, _ = vjp(dh.conj() if complex_ else dh)  # JAX's vjp is conjugate-linear
    parts = lambda x: tuple(p.astype(dtype) for p in _parts(x))
    run = jax.jit(
        scan_pallas.backward_parts, static_argnames=("reverse", "interpret", "kernel", "chunk_size")
    )
    g, da = run(
        parts(a), parts(dh), parts(h), parts(h0), keep=keep if resets else None,
        reverse=reverse, interpret=not COMPILED, kernel=kernel, chunk_size=64,
    )  # fmt: skip
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert g[0].dtype == dtype and g[0].shape == b.shape
    whole = lambda x: _whole(tuple(p.astype(jnp.float32) for p in x))
    assert _rel(whole(g), g_ref.conj() if complex_ else g_ref) <= tol
    assert da[0].shape == a.shape
    assert _rel(whole(da), da_ref.conj() if complex_ else da_ref) <= tol


def test_autodiff_raises_a_clear_error():
    a, b, h0 = _inputs(0, (2,), 9, 4, complex_=True, full_a=False)
    out = _scan_jit(a, b, h0=h0, method="pallas", grad="autodiff")  # values are fine
    assert _rel(out, _scan_jit(a, b, h0=h0, method="sequential")) <= 1e-5
    with pytest.raises(NotImplementedError, match="grad='recurrence'"):
        jax.grad(_loss)(a, b, h0, method="pallas", grad="autodiff")


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_accumulates_in_float32(kernel):
    """bf16 in and out, float32 inside: the error is bf16 rounding, not growing with L."""
    a, b, h0 = _inputs(1, (2,), 1000, 256, complex_=False, full_a=False)
    a = jnp.asarray(np.linspace(0.99, 0.9999, 256), jnp.float32)  # long memory
    a16, b16, h016 = (x.astype(jnp.bfloat16) for x in (a, b, h0))
    ref = _scan_jit(
        *(x.astype(jnp.float32) for x in (a16, b16)),
        h0=h016.astype(jnp.float32),
        method="sequential",
    )
    out = _kernel_jit(a16, b16, h016, interpret=not COMPILED, kernel=kernel)
    assert out.dtype == jnp.bfloat16
    assert _rel(out.astype(jnp.float32), ref) <= 1e-2
    # A bf16 recurrence would drift far more: 1000 steps of rounding the state.
    naive = _scan_jit(a16, b16, h0=h016, method="sequential")
    assert _rel(out.astype(jnp.float32), ref) < 0.5 * _rel(naive.astype(jnp.float32), ref)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU suite simulates 8)")
def test_sharded_inputs_are_scanned_per_device():
    """Rows and channels sharded: each device scans its own, with no gathering of b;
    the same under the trainer's activation mesh (a shard_map) and a split sequence."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lrulm import sharding

    a, b, h0 = _inputs(3, (4,), 40, 16, complex_=True, full_a=False)
    ref = _scan_jit(a, b, h0=h0, method="sequential")
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    f = jax.jit(lambda a, b, h0: linear_scan(a, b, h0=h0, method="pallas"))
    args = put(a, "tensor"), put(b, "data", None, "tensor"), put(h0, "data", "tensor")
    out = f(*args)
    assert _rel(out, ref) <= 1e-5 and out.sharding.spec == P("data", None, "tensor")
    assert "all-gather" not in f.lower(*args).compile().as_text()
    # A sequence split across devices is gathered, not scanned piecewise.
    assert _rel(f(args[0], put(b, None, "data", "tensor"), args[2]), ref) <= 1e-5
    trainer_mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "sequence": 1, "tensor": 4})
    with sharding.activation_sharding(trainer_mesh):
        g = jax.jit(lambda a, b, h0: linear_scan(a, b, h0=h0, method="pallas"))
        assert _rel(g(a, b, h0), ref) <= 1e-5
    # The planar form with a (B, L) reset mask: the mask is split with b's rows.
    resets = _resets(4, (4, 40))
    ref = _scan_jit(
        jnp.where(resets[..., None], 0, jnp.broadcast_to(a, b.shape)), b, h0=h0, method="sequential"
    )
    planar = jax.jit(
        lambda a, b, h0, r: scan_lib.linear_scan_planar(a, b, h0=h0, resets=r, method="pallas")
    )
    split = lambda x, *spec: (put(x.real, *spec), put(x.imag, *spec))
    args = split(a, "tensor"), split(b, "data", None, "tensor"), split(h0, "data", "tensor")
    out = planar(*args, put(resets, "data", None))
    assert _rel(jax.lax.complex(*out), ref) <= 1e-5
    assert out[0].sharding.spec == P("data", None, "tensor")
    assert "all-gather" not in planar.lower(*args, put(resets, "data", None)).compile().as_text()
    # And the fused backward, split the same way (da's row sums are reduced across devices).
    w = jnp.linspace(-1.0, 1.0, 16)

    def loss(a, b, h0, r, method):
        hr, hi = scan_lib.linear_scan_planar(a, b, h0=h0, resets=r, method=method)
        return jnp.sum(hr * w) + jnp.sum(hi**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=4)
    g = grads(*args, put(resets, "data", None), "pallas")
    g_ref = grads(*args, put(resets, "data", None), "sequential")
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _rel(x, y) <= 1e-5


@pytest.mark.skipif(COMPILED, reason="lowers for devices this machine does not have")
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU suite simulates 8)")
def test_kernels_inside_a_type_checked_shard_map_lower_for_gpu_and_tpu():
    """jax.shard_map's type checks (check_vma, its default) ask every pallas_call result
    to say which mesh axes it varies over; the kernels' results vary as b does, so a
    user's own shard_map around method="pallas" lowers for a GPU and compiles for a TPU,
    with the replicated decay's gradient summed over the devices (one all-reduce).
    Pallas's CPU interpreter cannot run under those checks (jax 0.10: its block indices
    vary over no mesh axis): there the shard_map needs check_vma=False, as jax says."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from lrulm import sharding, target

    def grad_fn(mesh):
        def loss(a, b):
            local = lambda a, b: linear_scan(a, b, method="pallas", chunk_size=256)
            scan = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
            return jnp.sum(jnp.abs(scan(a, b)) ** 2)

        return jax.grad(loss, argnums=(0, 1))

    a, b, _ = _inputs(5, (8,), 64, 256, complex_=True, full_a=False)
    text = _cuda_text(grad_fn(sharding.make_mesh(dict(data=8))), a, b)
    assert text.count("__gpu$xla.gpu.triton") == 2 and text.count("all_reduce") == 1

    try:
        devices = compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"))
    except Exception as e:  # no libtpu wheel, or a libtpu without the topology API
        pytest.skip(f"TPU topology API unavailable (install jax[tpu] for libtpu): {e}")
    mesh = Mesh(np.array(devices), ("data",))
    spec = lambda shape, s: jax.ShapeDtypeStruct(shape, a.dtype, sharding=NamedSharding(mesh, s))
    with target.compiling_for("tpu"):
        lowered = jax.jit(grad_fn(mesh)).lower(spec(a.shape, P()), spec((8, 1024, 256), P("data")))
        text = lowered.compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 2 and "all-reduce" in text


@pytest.mark.parametrize("kernel", KERNELS)
def test_b_still_needed_after_the_scan_is_not_overwritten(kernel):
    """The kernels write h over b (and g over dh); when the program uses b afterwards,
    XLA must keep a copy, so the aliasing never changes a value the caller sees."""
    a, b, h0 = _inputs(5, (2,), 40, 256, complex_=True, full_a=False)
    parts = lambda x: (x.real, x.imag)

    @jax.jit
    def f(a, b):
        h = scan_pallas.forward_parts(
            parts(a), parts(b), kernel=kernel, chunk_size=16, overwrite_b=True
        )
        return h, parts(b)  # b read after the kernel ran

    (hr, hi), (br, bi) = f(a, b)
    np.testing.assert_array_equal(br, b.real)
    np.testing.assert_array_equal(bi, b.imag)
    ref = linear_scan(a, b, method="sequential")
    assert _rel(jax.lax.complex(hr, hi), ref) <= 1e-5


def test_vmap_maps_to_rows():
    """vmap over linear_scan, one decay vector per mapped index: values and gradients."""
    a, b, h0 = _inputs(4, (3, 2), 13, 5, complex_=True, full_a=False)
    a = jnp.stack([a, 0.9 * a, a * 1j])  # (3, N): mapped with b

    def grads(method):
        g = jax.grad(lambda a, b, h0: _loss(a, b, h0, method=method), argnums=(0, 1, 2))
        return jax.jit(jax.vmap(g))(a, b, h0)

    for x, y in zip(grads("pallas"), grads("sequential")):
        assert _rel(x, y) <= 1e-5


def test_auto_keeps_xla_methods_until_the_kernels_ran_on_hardware():
    # Flip to PALLAS once tools/gpu_check.sh (and a TPU run) confirm speed and values.
    for backend in ("gpu", "cuda", "tpu"):
        assert scan_lib.resolve("auto", backend) is not scan_lib.ScanMethod.PALLAS
    assert scan_lib.resolve("pallas", "gpu") is scan_lib.ScanMethod.PALLAS
