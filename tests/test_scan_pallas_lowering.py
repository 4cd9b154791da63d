"""The Pallas kernels lowered and compiled ahead of time on a host without the
accelerator: Pallas->Triton for CUDA (two kernels, their operands), Mosaic for a TPU
v5e (compiled, the layer's HBM traffic, the schedule under the HBM time). Their values and
gradients: test_scan_pallas.py. Skipped where the kernels are compiled for the device
(LRULM_TEST_PALLAS_COMPILED=1): the compiled tests run the kernels themselves."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import test_scan_pallas as base

from lrulm import compile as compile_lib
from lrulm import scan as scan_lib
from lrulm.scan import linear_scan

pytestmark = pytest.mark.skipif(base.COMPILED, reason="the compiled tests run the kernel itself")


def test_gpu_kernel_lowers_to_triton():
    """The GPU kernel passes the Pallas->Triton lowering (no GPU needed to lower)."""
    a, b, h0 = base._inputs(2, (8,), 2048, 1000, complex_=True, full_a=True)
    f = jax.grad(
        lambda a, b, h0: jnp.sum(linear_scan(a, b, h0=h0, method="pallas").real), argnums=(0, 1, 2)
    )
    text = base._cuda_text(f, a, b, h0)
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


def test_tpu_kernel_compiles_ahead_of_time():
    """Mosaic compiles the TPU kernel for a v5e (libtpu compiles without a TPU)."""
    from jax.sharding import SingleDeviceSharding

    try:
        devices = compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"))
    except Exception as e:  # no libtpu wheel, or a libtpu without the topology API
        pytest.skip(f"TPU topology API unavailable (install jax[tpu] for libtpu): {e}")
    device = devices[0]
    spec = lambda s, d: jax.ShapeDtypeStruct(s, d, sharding=SingleDeviceSharding(device))
    f = jax.grad(
        lambda a, b: jnp.sum(linear_scan(a, b, method="pallas", reverse=True).real), argnums=(0, 1)
    )
    lowered = jax.jit(f).lower(spec((1024,), jnp.complex64), spec((8, 2000, 1024), jnp.complex64))
    text = lowered.compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 2

    # The planar form with resets: the kernel reads b, h0, the decay's power tables and
    # a (B, L, 1) keep mask, not a (B, L, N) decay array.
    f = jax.grad(
        lambda a, b, r: jnp.sum(
            scan_lib.linear_scan_planar(a, b, resets=r, method="pallas")[0] ** 2
        ),
        argnums=(0, 1),
    )
    parts = lambda shape: (spec(shape, jnp.float32),) * 2
    lowered = jax.jit(f).lower(parts((1024,)), parts((8, 2000, 1024)), spec((8, 2000), bool))
    calls = [
        line[line.index("operand_layout_constraints={") :]
        for line in lowered.compile().as_text().splitlines()
        if 'custom_call_target="tpu_custom_call"' in line
    ]
    assert len(calls) == 2
    tables, seq, state, column = "32,1024", "8,2000,1024", "8,1,1024", "bf16[8,2000,1]"
    # a enters as its parts' power tables (32, N): a^1..a^8 for the carry, a, a^2, a^4.
    # The forward reads b; the fused backward dh, h and h again (the rows entering each
    # chunk), and keep twice (shifted for g's recurrence, as is for da), in bfloat16.
    forward = [f"f32[{x}]" for x in [tables] * 2 + [seq] * 2 + [state] * 2] + [column]
    backward = [f"f32[{x}]" for x in [tables] * 2 + [seq] * 6 + [state] * 2] + [column] * 2
    operands = [re.findall(r"\b(?:f32|bf16)\[[0-9,]*\]", c) for c in calls]
    assert sorted(operands) == sorted([forward, backward])


def test_tpu_lru_layer_moves_no_activation_twice(tmp_path):
    """An LRU layer's forward and backward with the TPU kernel, compiled for a v5e by
    tools/lru_layer_aot.py: the kernels read and write (B, L, N) in the layout XLA's
    matmuls use, so no relayout copy of an activation appears (a (L, N/128, 128) view
    cost one per operand and result; the chunked scan's reshapes show the count works),
    and XLA's byte count is under a third of the associative scan's."""
    try:
        compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"))
    except Exception as e:
        pytest.skip(f"TPU topology API unavailable (install jax[tpu] for libtpu): {e}")
    out = tmp_path / "rows.json"
    args = ["--shape", "2,512,256,384", "--methods", "pallas,associative,chunked", "--json"]
    run = subprocess.run(
        [sys.executable, "tools/lru_layer_aot.py", *args, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["method"]: r for r in json.load(open(out))}
    assert rows["pallas"]["relayout_copies"] == 0
    assert rows["chunked"]["relayout_copies"] > 0
    assert rows["pallas"]["bytes_gb"] < rows["associative"]["bytes_gb"] / 3


def test_tpu_kernels_schedule_under_the_hbm_time(tmp_path):
    """tools/tpu_kernel_schedule.py reads the v5e compiler's final VLIW schedule of every
    TPU kernel variant: the inner loop (one tile) and a whole grid step take fewer bundles
    (cycles) than HBM needs for their bytes, so the kernels can run at the bandwidth limit
    on a v5e. A change that bloats a kernel's loop past that fails here."""
    try:
        compile_lib.topology_devices(compile_lib.parse_topology("v5e:1x1"))
    except Exception as e:
        pytest.skip(f"TPU topology API unavailable (install jax[tpu] for libtpu): {e}")
    out = tmp_path / "rows.json"
    args = ["--shape", "2,1024,768", "--json", str(out)]
    scratch = tmp_path / "tmp"  # where the compiler's dump goes, and is removed from
    scratch.mkdir()
    run = subprocess.run(
        [sys.executable, "tools/tpu_kernel_schedule.py", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TMPDIR=str(scratch)),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.listdir(scratch) == []
    rows = json.load(open(out))
    cases = {r["case"] for r in rows}
    assert len(rows) == len(cases) == 7, cases  # one kernel found per compiled variant
    assert {"forward, a (N,), resets", "backward, a (N,), resets"} <= cases
    for r in rows:
        assert 20 < r["loop_bundles"] < r["hbm_cycles"], r
        assert r["est_pct_of_hbm"] == 100, r
        assert r["slots"]["VALU"][0] > 0, r


def test_planar_resets_lower_to_triton_without_a_decay_array():
    """The planar form with document resets lowers to two Triton calls: the forward reads
    the (N,) decay parts, b's parts, h0's parts and a (B, L) keep mask and writes h; the
    fused backward reads a, dh, h, h0 and keep and writes g and per-row da partial sums.
    No (B, L, N) decay array and no complex value anywhere in the program."""
    B, L, N = 4, 256, 1000
    a = (jnp.full((N,), 0.9), jnp.full((N,), 0.1))
    b = (jnp.ones((B, L, N)), jnp.ones((B, L, N)))
    resets = jnp.zeros((B, L), bool)
    f = jax.grad(
        lambda a, b: jnp.sum(
            scan_lib.linear_scan_planar(a, b, resets=resets, method="pallas")[0] ** 2
        ),
        argnums=(0, 1),
    )
    text = base._cuda_text(f, a, b)
    calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    signatures = []
    for call in calls:
        operands, results = call[call.rindex(": (") :].split(") -> ")
        signatures.append(
            (re.findall(r"tensor<([^>]*)>", operands), re.findall(r"tensor<([^>]*)>", results))
        )
    a_, seq, state, keep = f"{N}xf32", f"{B}x{L}x{N}xf32", f"{B}x{N}xf32", f"{B}x{L}xf32"
    forward = ([a_] * 2 + [seq] * 2 + [state] * 2 + [keep], [seq] * 2)
    backward = ([a_] * 2 + [seq] * 4 + [state] * 2 + [keep], [seq] * 2 + [state] * 2)
    assert sorted(signatures) == sorted([forward, backward]), signatures
    assert "complex" not in text
    # g is written over dh (operands 2 and 3, after a's two parts), and h over b when
    # asked (the LRU does): one (B, L, N) buffer per recurrence, not an input and an output.
    aliases = lambda call: re.findall(
        r"output_tuple_indices = \[(\d)\], operand_index = (\d+)", call
    )
    assert sorted(map(aliases, calls)) == [[], [("0", "2"), ("1", "3")]]
    over_b = jax.grad(
        lambda a, b: jnp.sum(
            scan_lib.linear_scan_planar(a, b, method="pallas", overwrite_b=True)[0] ** 2
        ),
        argnums=(0, 1),
    )
    text = base._cuda_text(over_b, a, b)
    calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    assert [aliases(call) for call in calls] == [[("0", "2"), ("1", "3")]] * 2
