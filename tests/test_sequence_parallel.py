"""Sequence parallelism: the recurrence split 2, 4 and 8 ways equals the unsplit one."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrulm import config as config_lib
from lrulm import sequence_parallel as sp
from lrulm import sharding, train
from lrulm.model import Stack
from lrulm.model_config import from_preset
from lrulm.scan import linear_scan, linear_scan_planar


def _inputs(seed, shape):
    rng = np.random.default_rng(seed)
    b, l, n = shape
    mag = rng.uniform(0.5, 0.99, shape)
    a_full = (mag * np.exp(1j * rng.uniform(0, 6, shape))).astype(np.complex64)
    x = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    h0 = (rng.normal(size=(b, n)) + 1j * rng.normal(size=(b, n))).astype(np.complex64)
    return jnp.asarray(a_full), jnp.asarray(x), jnp.asarray(h0)


@pytest.mark.parametrize(
    "shards, time_varying, reverse, method",
    [(s, t, r, "chunked") for s in (2, 4, 8) for t in (False, True) for r in (False, True)]
    + [(4, False, False, "pallas"), (2, True, True, "pallas")],  # the kernel per segment
)
def test_split_scan_equals_unsplit(shards, time_varying, reverse, method):
    a_full, b, h0 = _inputs(shards, (4, 64, 6))
    a = a_full if time_varying else a_full[0, 0]
    mesh = sharding.make_mesh(dict(data=8 // shards, sequence=shards))

    def loss(a, b, h0, split):
        if split:
            h = sp.scan_over_mesh(
                a, b, h0=h0, reverse=reverse, mesh=mesh, method=method, chunk_size=4
            )
        else:
            h = linear_scan(a, b, h0=h0, reverse=reverse, method="sequential")
        return jnp.sum(h.real * jnp.arange(6)) + jnp.sum(jnp.abs(h) ** 2), h

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    g_ref, h_ref = grad(a, b, h0, False)
    g, h = grad(a, b, h0, True)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    for x, y in zip(g, g_ref):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(y))))


@pytest.mark.parametrize(
    "shards, reverse, method, with_h0, length",
    [(2, False, "chunked", True, 512), (4, True, "chunked", True, 512),
     (8, False, "associative", False, 64), (4, False, "pallas", True, 64),
     (2, True, "pallas", False, 512)],
)  # fmt: skip
def test_split_planar_scan_with_resets_equals_unsplit(shards, reverse, method, with_h0, length):
    """The LRU's path: (n,) decays on parts, documents starting anywhere (in the middle of
    a segment, at a segment's first or last position, twice in one segment), h0.
    Segments of 128 and 256 positions take the two-level power tables, shorter ones the
    one-level fallback."""
    a_full, b, h0 = _inputs(shards + 10, (4, length, 6))
    split = lambda x: (x.real, x.imag)
    a, b, h0 = split(a_full[0, 0]), split(b), split(h0) if with_h0 else None
    seg = length // shards
    resets = np.zeros((4, length), bool)
    resets[0, [3, seg, 2 * seg - 1]] = True
    resets[1, [seg - 1, seg + 2, seg + 5]] = True
    resets[3, 0] = True
    resets = jnp.asarray(resets)
    mesh = sharding.make_mesh(dict(data=8 // shards, sequence=shards))

    def loss(a, b, h0, split):
        if split:
            h = sp.scan_over_mesh_parts(
                a, b, h0=h0, resets=resets, reverse=reverse, mesh=mesh, method=method,
                chunk_size=4 if length < 128 else 32,
            )  # fmt: skip
        else:
            h = linear_scan_planar(a, b, h0=h0, resets=resets, reverse=reverse, method="sequential")
        return jnp.sum(h[0] * jnp.arange(6)) + jnp.sum(h[0] ** 2 + 3 * h[1] ** 2), h

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    g_ref, h_ref = grad(a, b, h0, False)
    g, h = grad(a, b, h0, True)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(y))))


@pytest.mark.parametrize("time_varying", [False, True])
def test_split_scan_gradient_compiles_for_tpu(time_varying):
    """The split scan's gradient compiles for a TPU (v5e, libtpu without a chip): the
    transpose of a complex all-gather would be a complex reduce-scatter, which XLA's TPU
    compiler refuses, so the segment-end states cross devices as float pairs."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from lrulm import compile as compile_lib

    try:
        devices = compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"))
    except Exception as e:  # no libtpu wheel, or a libtpu without the topology API
        pytest.skip(f"TPU topology API unavailable (install jax[tpu] for libtpu): {e}")
    mesh = Mesh(np.array(devices), (sp.AXIS,))
    seq = P(None, sp.AXIS, None)

    def loss(a, b):
        # (n,) a: the two-pass planar scan; (b, l, n) a: scan, then correct
        scan = lambda a, b: linear_scan(a, b, method="associative", axis_name=sp.AXIS)
        specs = (seq if time_varying else P(None), seq)
        run = jax.shard_map(scan, mesh=mesh, in_specs=specs, out_specs=seq, check_vma=False)
        h = run(a, b)
        return jnp.sum(jnp.abs(h) ** 2)

    spec = lambda shape, s: jax.ShapeDtypeStruct(
        shape, jnp.complex64, sharding=NamedSharding(mesh, s)
    )
    a = spec((2, 512, 128), seq) if time_varying else spec((128,), P(None))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, spec((2, 512, 128), seq)).compile()
    collectives = [
        line for line in compiled.as_text().splitlines()
        if re.search(r"= \S+ (all-gather|reduce-scatter)(-start)?\(", line)
    ]  # fmt: skip
    assert collectives and not any("c64" in line for line in collectives), collectives


@pytest.mark.parametrize("shards", [2, 8])
def test_bidirectional_stack_split_equals_unsplit(shards):
    cfg = from_preset("test", bidirectional=True, norm="layer", vocab_size=0)
    stack = Stack(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 32, cfg.d_model))
    resets = jnp.zeros((2, 32), bool).at[1, 9].set(True)
    graphdef, params = nnx.split(stack)
    mesh = sharding.make_mesh(dict(data=8 // shards, sequence=shards))

    def loss(params, x, mesh):
        model = nnx.merge(graphdef, params)
        with sharding.activation_sharding(mesh):
            y = model(x, resets=resets)
        return jnp.sum(y**2), y

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)
    g_ref, y_ref = grad(params, x, None)
    g, y = grad(params, x, mesh)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b)) + 1))


@pytest.mark.parametrize("shards", [2, 4])
def test_bidirectional_layer_with_axis_name_takes_resets_across_segments(shards):
    """Called inside shard_map with axis_name, a bidirectional LRU's reverse half needs
    the first reset of the next segment (a document ends where the next one starts): a
    reset at a segment's first position and one inside a segment, against unsplit."""
    from lrulm.lru import LRU

    layer = LRU(4, 6, bidirectional=True, scan_method="sequential", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    u = jax.random.normal(jax.random.key(1), (2, 16, 4))
    resets = jnp.zeros((2, 16), bool).at[0, 8].set(True).at[1, 5].set(True)
    want = nnx.merge(graphdef, params)(u, resets=resets)
    mesh = sharding.make_mesh(dict(data=8 // shards, sequence=shards))
    split = jax.shard_map(
        lambda u, r: nnx.merge(graphdef, params)(u, resets=r, axis_name="sequence"),
        mesh=mesh,
        in_specs=(jax.P(None, "sequence", None), jax.P(None, "sequence")),
        out_specs=jax.P(None, "sequence", None),
        check_vma=False,
    )
    np.testing.assert_allclose(jax.jit(split)(u, resets), want, rtol=1e-5, atol=1e-5)


def _collective_bytes(hlo: str, op: str) -> int:
    """Sum of the result sizes of `op` instructions in compiled HLO text."""
    sizes = {"c64": 8, "f32": 4, "bf16": 2, "s32": 4}
    total = 0
    for dtype, dims in re.findall(rf"= (\w+)\[([\d,]*)\]\{{[^}}]*\}} {op}\(", hlo):
        total += sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def test_communication_matches_the_formula():
    shards, batch, n = 4, 4, 8
    _, b, _ = _inputs(0, (batch, 64, n))
    a = jnp.full((n,), 0.9 + 0.1j, jnp.complex64)
    mesh = sharding.make_mesh(dict(data=8 // shards, sequence=shards))
    fn = jax.jit(lambda b: sp.scan_over_mesh(a, b, mesh=mesh, method="chunked", chunk_size=4))
    hlo = fn.lower(b).compile().as_text()
    local_batch = batch // (8 // shards)
    expected = sp.comm_bytes_per_layer(local_batch, n, shards)["forward"]
    gathered = _collective_bytes(hlo, "all-gather")  # each device's result: S segments
    assert gathered * (shards - 1) // shards == expected
    grad = jax.jit(
        jax.grad(
            lambda b: jnp.sum(
                jnp.abs(sp.scan_over_mesh(a, b, mesh=mesh, method="chunked", chunk_size=4)) ** 2
            )
        )
    )
    hlo = grad.lower(b).compile().as_text()
    # the gradient gathers the exit states again (forward) and the entry cotangents
    assert _collective_bytes(hlo, "all-gather") * (shards - 1) // shards == 2 * expected
    assert _collective_bytes(hlo, "reduce-scatter") == 0


def test_communication_with_resets_matches_the_formula():
    shards, batch, n = 4, 4, 8
    _, b, _ = _inputs(0, (batch, 64, n))
    a = (jnp.full((n,), 0.9), jnp.full((n,), 0.1))
    resets = jnp.zeros((batch, 64), bool).at[:, 5].set(True)
    mesh = sharding.make_mesh(dict(data=8 // shards, sequence=shards))
    scan = lambda b: sp.scan_over_mesh_parts(
        a, b, resets=resets, mesh=mesh, method="chunked", chunk_size=4
    )
    hlo = jax.jit(scan).lower((b.real, b.imag)).compile().as_text()
    expected = sp.comm_bytes_per_layer(batch // (8 // shards), n, shards, resets=True)
    assert _collective_bytes(hlo, "all-gather") * (shards - 1) // shards == expected["forward"]


def test_training_with_a_sequence_axis_gives_the_same_losses(tmp_path, corpus):
    def losses(name, mesh, devices):
        pairs = [
            ("data.train_files", corpus["train"]),
            ("data.eval_files", corpus["eval"]),
            ("train.steps", "4"),
            ("train.log_every", "1"),
            ("train.eval_every", "0"),
        ]
        config = config_lib.load_with_overrides("configs/lm/tiny.py:test", pairs + mesh)
        workdir = str(tmp_path / name)
        train.train_and_evaluate(config, workdir, devices=devices)
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        return [(r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]

    # the gradients' norms too: the first step's loss does not depend on the backward pass
    full = losses("dp2", [("mesh.data", "2")], jax.devices()[:2])
    split = losses("dp2_sp4", [("mesh.data", "2"), ("mesh.sequence", "4")], None)
    assert len(full) == 4
    np.testing.assert_allclose(split, full, rtol=1e-5)


def test_a_sequence_axis_of_the_rest_says_to_size_the_data_axis():
    """mesh.data defaults to -1, so `--config.mesh.sequence=-1` alone names two axes "the
    rest": the error says which flag to add."""
    with pytest.raises(ValueError, match=r"mesh.data=-1 and mesh.sequence=-1 .*mesh.data=1$"):
        sharding.make_mesh(dict(data=-1, sequence=-1))
    assert dict(sharding.make_mesh(dict(data=1, sequence=-1)).shape)["sequence"] == 8


def test_split_layer_needs_no_more_memory_than_unsplit():
    """An LRU layer's forward and backward (Pallas kernels, resets) compiled for a v5e
    with the sequence split 4 ways needs the temporaries of the unsplit layer holding the
    same tokens per chip: 844 vs 842 MB with the two-pass scan from the entering state,
    2882 MB with the former scan-then-correct. Sized past v5e's 128 MiB of VMEM, where
    XLA would otherwise keep the temporaries."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lrulm import compile as compile_lib
    from lrulm.lru import LRU

    try:
        devices = compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"))
    except Exception as e:  # no libtpu wheel, or a libtpu without the topology API
        pytest.skip(f"TPU topology API unavailable (install jax[tpu] for libtpu): {e}")
    graph, params = nnx.split(LRU(512, 512, scan_method="pallas", rngs=nnx.Rngs(0)))

    def temporaries(mesh_spec, batch, length):
        mesh = sharding.make_mesh(mesh_spec, devices)

        def loss(params, u, resets):
            y = nnx.merge(graph, params)(u, resets=resets)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(
            shape, dtype, sharding=NamedSharding(mesh, s)
        )
        replicated = jax.tree.map(lambda x: spec(x.shape, x.dtype, P()), params)
        args = (
            replicated,
            spec((batch, length, 512), jnp.bfloat16, P("data", "sequence")),
            spec((batch, length), jnp.bool_, P("data", "sequence")),
        )
        with sharding.activation_sharding(mesh):  # as the trainer: around the gradient
            compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    split = temporaries(dict(data=1, sequence=4), 8, 32768)
    unsplit = temporaries(dict(data=4, sequence=1), 32, 8192)
    assert unsplit > 512 * 2**20 and split <= 1.05 * unsplit, (split, unsplit)


@pytest.mark.parametrize("method", ["sequential", "associative", "chunked"])
@pytest.mark.parametrize("split", ["batch", "sequence"])
def test_scans_inside_shard_map_with_its_type_checks(method, split):
    """jax.shard_map checks by default which values vary over which mesh axes: a
    replicated decay beside a sharded b (the usual case) scans, and its gradient is summed
    over the devices, by batch or (with axis_name) by sequence, equal to one device's."""
    a_full, b, h0 = _inputs(3, (8, 16, 4))
    a = a_full[0, 0]  # one decay per channel, replicated
    sizes = dict(data=8) if split == "batch" else dict(data=2, sequence=4)
    mesh = sharding.make_mesh(sizes)
    spec = jax.P("data") if split == "batch" else jax.P(None, "sequence")
    kw = dict(method=method, chunk_size=4, axis_name=None if split == "batch" else "sequence")

    def loss(a, b, scan):
        h = scan(a, b)
        return jnp.sum(jnp.abs(h) ** 2)

    local = lambda a, b: linear_scan(a, b, **kw)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(jax.P(), spec), out_specs=spec)
    plain = lambda a, b: linear_scan(a, b, method=method, chunk_size=4)
    want = jax.grad(loss, argnums=(0, 1))(a, b, plain)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(a, b, sharded)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(w))))
