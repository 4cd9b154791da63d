"""TPU generations and slices: accelerator types, topology names, and the one shape table."""

import math
import os
import pathlib
import subprocess
import sys

import pytest

from lrulm import compile as compile_lib
from lrulm import topologies

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"


@pytest.mark.parametrize(
    "accelerator,chips,hosts,per_host,topology,label",
    [
        ("v4-8", 4, 1, 4, "2x2x1", "tpu-v4-podslice"),
        ("v4-32", 16, 4, 4, "2x2x4", "tpu-v4-podslice"),
        ("v5p-8", 4, 1, 4, "2x2x1", "tpu-v5p-slice"),
        ("v5p-128", 64, 16, 4, "4x4x4", "tpu-v5p-slice"),
        ("v5p-256", 128, 32, 4, "4x4x8", "tpu-v5p-slice"),
        ("v5p-12288", 6144, 1536, 4, "16x16x24", "tpu-v5p-slice"),
        ("v5litepod-4", 4, 1, 4, "2x2", "tpu-v5-lite-podslice"),
        ("v5litepod-8", 8, 1, 8, "2x4", "tpu-v5-lite-podslice"),
        ("v5litepod-16", 16, 4, 4, "4x4", "tpu-v5-lite-podslice"),
        ("v5e-256", 256, 64, 4, "16x16", "tpu-v5-lite-podslice"),
        ("v6e-8", 8, 1, 8, "2x4", "tpu-v6e-slice"),
        ("v6e-64", 64, 16, 4, "8x8", "tpu-v6e-slice"),
    ],
)
def test_tpu_slices(accelerator, chips, hosts, per_host, topology, label):
    s = topologies.tpu_slice(accelerator)
    assert (s.chips, s.hosts, s.chips_per_host, s.topology, s.gke_accelerator) == (
        chips,
        hosts,
        per_host,
        topology,
        label,
    )
    assert s.machine_type.endswith(f"-{per_host}t")


def test_tpu_slice_names_and_errors():
    assert topologies.tpu_slice("v5e-16").accelerator_type == "v5litepod-16"  # gcloud's spelling
    with pytest.raises(ValueError, match="unknown TPU accelerator type 'v9-8'"):
        topologies.tpu_slice("v9-8")
    with pytest.raises(ValueError, match="does not have the 64 chips"):
        topologies.tpu_slice("v5p-128", "4x4x8")
    with pytest.raises(ValueError, match="v5p slices are AxBxC"):
        topologies.tpu_slice("v5p-128", "8x8")
    with pytest.raises(ValueError, match="96 chips.*pass the topology explicitly"):
        topologies.tpu_slice("v5p-192")
    with pytest.raises(ValueError, match="counts TensorCores, 2 per chip"):
        topologies.tpu_slice("v5p-7")
    assert topologies.tpu_slice("v5p-192", "4x4x6").hosts == 24


@pytest.mark.parametrize(
    "text, name, chips, accelerator",
    [
        ("v5p-128", "v5p:4x4x4", 64, "v5p-128"),
        ("v4-64", "v4:2x4x4", 32, "v4-64"),
        ("v4-8", "v4:2x2x1", 4, "v4-8"),
        ("v5e-16", "v5e:4x4", 16, "v5e-16"),
        ("v5litepod-256", "v5e:16x16", 256, "v5e-256"),
        ("v6e-64", "v6e:8x8", 64, "v6e-64"),
        ("V5P:4x4x8", "v5p:4x4x8", 128, "v5p-256"),
        ("v5e:2x2", "v5e:2x2", 4, "v5e-4"),
    ],
)
def test_topology_names(text, name, chips, accelerator):
    t = topologies.parse_topology(text)
    assert (t.name, t.chips, t.accelerator_type) == (name, chips, accelerator)


@pytest.mark.parametrize("text", ["v5p-7", "v5p-130", "v5e-3", "v7-8", "v5e:4x4x4", "tpu", ""])
def test_bad_topology_names_list_the_valid_forms(text):
    with pytest.raises(ValueError, match="v5p-128") as e:
        topologies.parse_topology(text)
    assert "v5litepod-16" in str(e.value) and "TensorCores" in str(e.value)


@pytest.mark.parametrize("text, chips", [("v5e:16x32", 512), ("v5p:16x16x32", 8192)])
def test_a_shape_larger_than_the_largest_slice_is_refused(text, chips):
    with pytest.raises(ValueError, match=f"has {chips} chips; the largest .* slice has"):
        topologies.parse_topology(text)


@pytest.mark.parametrize("text", ["v5e:3x3", "v6e:2x5", "v5e:3x1", "v5p:1x2x1", "v4:3x4x4"])
def test_shapes_no_slice_has_are_refused(text):
    """A multi-host slice is built of 4-chip VMs, a single VM holds a listed size: 3x3 was
    described as 2 hosts of 4 chips (9 chips), 2x5 as a 5-chip machine type."""
    with pytest.raises(ValueError, match=r"is no v\d[ep]? slice: one VM holds .* 4-chip VMs"):
        topologies.describe(text)
    assert topologies.describe("v5p:4x4x12").hosts == 48  # custom, but whole 2x2x1 hosts


def test_shape_table_doubles_the_last_smallest_side():
    for dims, shapes in topologies.SHAPES.items():
        previous = None
        for chips, shape in shapes.items():
            sides = [int(d) for d in shape.split("x")]
            assert len(sides) == dims and math.prod(sides) == chips, shape
            if previous is not None and chips == 2 * math.prod(previous):
                last = max(i for i, d in enumerate(previous) if d == min(previous))
                previous[last] *= 2
                assert sides == previous, shape
            previous = sides


@pytest.mark.parametrize("generation", topologies.GENERATIONS.values(), ids=lambda g: g.name)
def test_launchers_and_compiler_read_one_table(generation):
    """Every accelerator type: the launchers' slice is the slice the compiler compiles for."""
    for chips in generation.shapes:
        count = chips * generation.cores_per_name_unit
        s = topologies.tpu_slice(f"{generation.accelerator_name}-{count}")
        t = compile_lib.parse_topology(f"{generation.name}-{count}")
        assert (s.chips, s.topology, s.hosts) == (t.chips, t.shape, t.hosts)
        assert compile_lib.parse_topology(s.accelerator_type) == t


def test_launchers_need_only_the_standard_library(tmp_path):
    """`python -S` (no site-packages: no jax, no installed lrulm) from another directory."""
    result = subprocess.run(
        [sys.executable, "-S", str(LAUNCH / "gke.py"), "--name", "a", "--image", "i",
         "--accelerator_type", "v5p-128", "--dry_run", "--", "lrulm", "train"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "16 pods x 4 chips, topology 4x4x4" in result.stdout


def test_topologies_cli_takes_both_spellings_and_says_what_is_wrong():
    """`python -m lrulm.topologies` (launch/README.md) prints the slice of an accelerator
    type or a GENERATION:SHAPE topology, and a bad name is a one-line error, no traceback."""
    run = lambda *names: subprocess.run(
        [sys.executable, "-m", "lrulm.topologies", *names], capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    result = run("v5p:4x4x4", "v5e:4x4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "accelerator_type='v5p-128'" in lines[0] and "hosts=16" in lines[0]
    assert "accelerator_type='v5litepod-16'" in lines[1] and "hosts=4" in lines[1]
    assert topologies.describe("v5p:4x4x12") == topologies.tpu_slice("v5p-384", "4x4x12")
    result = run("v5p-127")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: v5p-127 is not a whole number of chips")
