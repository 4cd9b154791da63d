"""TPU generations and slices: names, shapes, hosts, chips; the one table (standard library only).
Also the GPU hosts `lrulm compile` can target (h100:8): what XLA is told about each card.

The launchers (launch/*.py, on a workstation without jax) and `lrulm compile` both read it.
Sources: Cloud TPU docs ("TPU v4", "TPU v5e", "TPU v5p", "TPU v6e" system architecture pages,
"Plan TPUs in GKE"):
- v4 and v5p accelerator types count TensorCores (2 per chip): v5p-128 is 64 chips. Slices are
  3D tori (v5p-128 = 4x4x4) and every host has 4 chips (16 hosts).
- v5e and v6e accelerator types count chips; v5e is spelt v5litepod-N. Slices are 2D. Up to 8
  chips fit one host (v5litepod-8 and v6e-8 are single-host 2x4 VMs); multi-host slices use
  4-chip VMs (v5litepod-16 = 4x4 on 4 hosts).

    python -m lrulm.topologies v5p-128 v5litepod-16    # prints the slices
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# chips -> the shape of the slice Cloud TPU creates for that many chips (the shapes its
# accelerator types list), by torus rank. Each doubles the last of the smallest sides.
SHAPES: dict[int, dict[int, str]] = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
        6144: "16x16x24"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
}  # fmt: skip
# Multi-host v5e/v6e slices are built from 4-chip VMs; v4/v5p hosts always have 4 chips.
MULTI_HOST_CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    """A TPU generation: how its slices are named, shaped and hosted, and what one chip has.

    Attributes:
      name: the generation as libtpu's topology strings spell it ("v5e").
      accelerator_name: as Cloud TPU accelerator types spell it ("v5litepod").
      cores_per_name_unit: what the number in an accelerator type counts, per chip: v4 and
        v5p count TensorCores (two per chip: v5p-128 is 64 chips); v5e and v6e count chips.
      dims: 3 for a 3D torus (v4, v5p), 2 for a 2D one (v5e, v6e).
      max_chips: the largest slice; its shapes are `SHAPES[dims]` up to it.
      max_single_host_chips: the largest slice that fits on one VM.
      hbm_gib: HBM per chip, GiB.
      hbm_bytes_per_s: HBM bandwidth per chip.
      gke_accelerator: value of the `cloud.google.com/gke-tpu-accelerator` node label.
      machine_prefix: GKE machine type without the chip-count suffix (`-4t`).
      runtime_version: TPU VM software version for `gcloud compute tpus tpu-vm create`.
      topology_kwargs: extra arguments for libtpu's topology description.
    """

    name: str
    accelerator_name: str
    cores_per_name_unit: int
    dims: int
    max_chips: int
    max_single_host_chips: int
    hbm_gib: float
    hbm_bytes_per_s: float
    gke_accelerator: str
    machine_prefix: str
    runtime_version: str
    topology_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def shapes(self) -> dict[int, str]:
        """chips -> the default slice shape, for every slice size of this generation."""
        return {c: s for c, s in SHAPES[self.dims].items() if c <= self.max_chips}


_3D = dict(cores_per_name_unit=2, dims=3, max_single_host_chips=4)
_2D = dict(cores_per_name_unit=1, dims=2, max_single_host_chips=8)
GENERATIONS: dict[str, Generation] = {
    g.name: g
    for g in (
        # v4: 32 GiB, 1200 GB/s. One JAX device per chip ("megacore"), as on a v4 VM;
        # without it libtpu describes each TensorCore as a device with half the HBM.
        Generation(name="v4", accelerator_name="v4", **_3D, max_chips=4096, hbm_gib=32,
                   hbm_bytes_per_s=1200e9, gke_accelerator="tpu-v4-podslice",
                   machine_prefix="ct4p-hightpu", runtime_version="tpu-ubuntu2204-base",
                   topology_kwargs=(("chip_config_name", "megacore"),)),
        # v5p: 95 GiB, 2765 GB/s; the largest single slice is 16x16x24.
        Generation(name="v5p", accelerator_name="v5p", **_3D, max_chips=6144, hbm_gib=95,
                   hbm_bytes_per_s=2765e9, gke_accelerator="tpu-v5p-slice",
                   machine_prefix="ct5p-hightpu", runtime_version="v2-alpha-tpuv5"),
        # v5e: 16 GiB, 819 GB/s.
        Generation(name="v5e", accelerator_name="v5litepod", **_2D, max_chips=256, hbm_gib=16,
                   hbm_bytes_per_s=819e9, gke_accelerator="tpu-v5-lite-podslice",
                   machine_prefix="ct5lp-hightpu", runtime_version="v2-alpha-tpuv5-lite"),
        # v6e (Trillium): 32 GB, 1638 GB/s.
        Generation(name="v6e", accelerator_name="v6e", **_2D, max_chips=256, hbm_gib=32,
                   hbm_bytes_per_s=1638e9, gke_accelerator="tpu-v6e-slice",
                   machine_prefix="ct6e-standard", runtime_version="v2-alpha-tpuv6e"),
    )
}  # fmt: skip
# Both spellings name a generation: "v5e-16" and "v5litepod-16" are the same slice.
_BY_NAME = {n: g for g in GENERATIONS.values() for n in (g.name, g.accelerator_name)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice of one generation with a shape ("4x4x4"): its chips and hosts."""

    generation: Generation
    shape: str

    def __post_init__(self):
        """Refuses shapes no slice has: a single VM holds one of the listed sizes, and
        larger slices are built of 4-chip VMs (2x2 chips, x1 on a 3D torus), so both of
        the first two sides are even."""
        gen, dims = self.generation, [int(d) for d in self.shape.split("x")]
        single = [c for c in gen.shapes if c <= gen.max_single_host_chips]
        if self.chips <= gen.max_single_host_chips:
            ok = self.chips in single
        else:
            ok = dims[0] % 2 == 0 and dims[1] % 2 == 0
        if not ok:
            raise ValueError(
                f"TPU topology {self.name} ({self.chips} chips) is no {gen.name} slice: one VM "
                f"holds {', '.join(map(str, single))} chips, and larger slices are built of "
                f"4-chip VMs ({'2x2x1' if gen.dims == 3 else '2x2'}), so their first two sides "
                "are even"
            )

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.shape.split("x"))

    @property
    def name(self) -> str:  # libtpu's spelling
        return f"{self.generation.name}:{self.shape}"

    @property
    def accelerator_type(self) -> str:  # Cloud TPU's, with libtpu's generation name ("v5e-16")
        return f"{self.generation.name}-{self.chips * self.generation.cores_per_name_unit}"

    @property
    def hosts(self) -> int:
        """TPU VMs (= JAX processes = GKE pods) in the slice."""
        if self.chips <= self.generation.max_single_host_chips:
            return 1
        return self.chips // MULTI_HOST_CHIPS_PER_HOST

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts


_FORMS = {3: "AxBxC", 2: "AxB"}


def _unit(gen: Generation) -> str:
    return "TensorCores, 2 per chip" if gen.cores_per_name_unit == 2 else "chips"


def _valid_forms() -> str:
    lines = []
    for g in GENERATIONS.values():
        sizes = ", ".join(f"{g.name}-{c * g.cores_per_name_unit}" for c in g.shapes)
        lines.append(f"  {g.name} (counts {_unit(g)}): {sizes}")
    return (
        "use an accelerator type or GENERATION:SHAPE, e.g. v5p-128, v4-64, v5e-16 "
        "(or v5litepod-16), v6e-64, v5p:4x4x4, v5e:4x4. Accelerator types:\n" + "\n".join(lines)
    )


def parse_topology(text: str) -> Topology:
    """`v5p-128`, `v5litepod-16`, `v5p:4x4x4` or `v5e:4x4` -> a Topology.

    Raises:
      ValueError: naming the valid forms, for anything else.
    """
    spec = text.strip().lower()
    if m := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", spec):
        gen = _BY_NAME.get(m.group(1))
        ndim = gen.dims if gen is not None else 2
        if gen is not None and len(m.group(2).split("x")) == ndim and "x0" not in "x" + m[2]:
            chips = math.prod(int(d) for d in m.group(2).split("x"))
            if chips > gen.max_chips:
                raise ValueError(
                    f"TPU topology {text!r} has {chips} chips; the largest {gen.name} slice "
                    f"has {gen.max_chips}"
                )
            return Topology(gen, m.group(2))
        if gen is not None:
            raise ValueError(
                f"TPU topology {text!r}: {gen.name} slices are {ndim}-D "
                f"({_FORMS[ndim]}, positive); {_valid_forms()}"
            )
    elif m := re.fullmatch(r"([a-z0-9]+)-(\d+)", spec):
        gen = _BY_NAME.get(m.group(1))
        if gen is not None:
            chips, rest = divmod(int(m.group(2)), gen.cores_per_name_unit)
            if not rest and chips in gen.shapes:
                return Topology(gen, gen.shapes[chips])
            raise ValueError(f"TPU topology {text!r}: no {gen.name} slice of that size; "
                             + _valid_forms())  # fmt: skip
    raise ValueError(f"unknown TPU topology {text!r}; {_valid_forms()}")


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice, as launchers need it.

    Attributes:
      accelerator_type: as gcloud spells it, e.g. "v5p-128", "v5litepod-16".
      generation: libtpu's name of the generation, e.g. "v5p", "v5e".
      chips: Chips in the slice.
      hosts: TPU VMs (= JAX processes = GKE pods) in the slice.
      chips_per_host: Chips per VM (the `google.com/tpu` request per pod).
      topology: Chip arrangement, e.g. "4x4x4" (the `cloud.google.com/gke-tpu-topology` label).
      gke_accelerator: The `cloud.google.com/gke-tpu-accelerator` label.
      machine_type: GKE machine type of the node pool, e.g. "ct5p-hightpu-4t".
      runtime_version: TPU VM software version.
    """

    accelerator_type: str
    generation: str
    chips: int
    hosts: int
    chips_per_host: int
    topology: str
    gke_accelerator: str
    machine_type: str
    runtime_version: str


def tpu_slice(accelerator_type: str, topology: str | None = None) -> TpuSlice:
    """Describes a slice from its accelerator type (`v5p-128`, `v5litepod-16`, `v6e-64`, ...).

    Args:
      accelerator_type: `<generation>-<count>`; `v5e-N` is accepted for `v5litepod-N`.
      topology: Chip arrangement, for slices whose shape is not the default (e.g. "4x4x12").

    Returns:
      The slice description.

    Raises:
      ValueError: unknown generation, malformed name, a size with no default shape and no
        topology, or a topology with the wrong chip count.
    """
    name, _, count = accelerator_type.rpartition("-")
    gen = _BY_NAME.get(name)
    if gen is None or not count.isdigit():
        known = ", ".join(f"{g.accelerator_name}-N" for g in GENERATIONS.values())
        raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}; use one of {known}")
    chips, rest = divmod(int(count), gen.cores_per_name_unit)
    if rest or not chips:
        raise ValueError(f"{accelerator_type} is not a whole number of chips: "
                         f"{gen.accelerator_name}-N counts {_unit(gen)}")  # fmt: skip
    if topology is None:
        if chips not in gen.shapes:
            raise ValueError(
                f"{accelerator_type} ({chips} chips) has no default topology; pass the topology "
                f"explicitly ({_FORMS[gen.dims]}), or use {gen.accelerator_name}-N for N in "
                + ", ".join(str(c * gen.cores_per_name_unit) for c in gen.shapes)
            )
        topology = gen.shapes[chips]
    elif not re.fullmatch("x".join([r"[1-9]\d*"] * gen.dims), topology):
        raise ValueError(f"topology {topology!r}: {gen.name} slices are {_FORMS[gen.dims]}")
    t = Topology(gen, topology)
    if t.chips != chips:
        raise ValueError(
            f"topology {topology} does not have the {chips} chips of {accelerator_type}"
        )
    return TpuSlice(
        accelerator_type=f"{gen.accelerator_name}-{count}",
        generation=gen.name,
        chips=chips,
        hosts=t.hosts,
        chips_per_host=t.chips_per_host,
        topology=topology,
        gke_accelerator=gen.gke_accelerator,
        machine_type=f"{gen.machine_prefix}-{t.chips_per_host}t",
        runtime_version=gen.runtime_version,
    )


# ==========================================================================================
# GPU hosts (`lrulm compile --topology h100:8`): what XLA is told about each card.
# ==========================================================================================


@dataclasses.dataclass(frozen=True)
class GpuKind:
    """A GPU model, as XLA is told about it (its GpuTargetConfigProto) and the report
    counts it."""

    name: str  # as --topology spells it: "h100"
    description: str  # the device_kind XLA reports (what metrics.PEAK_FLOPS matches)
    memory_bytes: int  # the device memory CUDA reports
    hbm_bytes_per_s: float
    sms: int = 132

    @property
    def hbm_gib(self) -> float:
        return self.memory_bytes / 1024**3

    def target_config(self) -> str:
        """XLA's description of the GPU to compile for: what
        --xla_gpu_target_config_filename reads, and jax passes as `target_config`."""
        return f"""gpu_device_info {{
  cuda_compute_capability {{ major: 9 minor: 0 }}
  threads_per_block_limit: 1024  threads_per_warp: 32
  shared_memory_per_block: 49152  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472  threads_per_core_limit: 2048
  core_count: {self.sms}  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.hbm_bytes_per_s)}  l2_cache_size: 52428800
  clock_rate_ghz: 1.98  device_memory_size: {self.memory_bytes}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{self.description}"
"""


# Hopper SXM cards: 80 GB HBM3 at 3.35 TB/s, 141 GB HBM3e at 4.8 TB/s (NVIDIA's data
# sheets), 132 SMs; memory as CUDA reports it (the H100's as XLA's own H100 spec has it).
GPU_KINDS = {
    k.name: k
    for k in (
        GpuKind("h100", "NVIDIA H100 80GB HBM3", 84_929_347_584, 3.35e12),
        GpuKind("h200", "NVIDIA H200", 150_754_820_096, 4.8e12),
    )
}
MAX_GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """`count` GPUs of one kind in each of `hosts` hosts (a process per host)."""

    generation: GpuKind
    count: int
    hosts: int = 1

    @property
    def chips(self) -> int:
        return self.count * self.hosts

    @property
    def name(self) -> str:
        return f"{self.generation.name}:{self.count}" + (f"x{self.hosts}" if self.hosts > 1 else "")

    @property
    def accelerator_type(self) -> str:
        hosts = f"{self.hosts} hosts x " if self.hosts > 1 else ""
        return f"{hosts}{self.count} x {self.generation.name.upper()}"


def parse_target(text: str) -> Topology | GpuTopology:
    """A TPU topology (`parse_topology`) or GPUs: "h100" (one), "h100:8" (a host of 8),
    "h100:8x4" (4 hosts of 8)."""
    kind, _, shape = text.lower().partition(":")
    if kind not in GPU_KINDS:
        try:
            return parse_topology(text)
        except ValueError as e:
            gpus = ", ".join(f"{k}[:N[xHOSTS]]" for k in GPU_KINDS)
            raise ValueError(f"{e}\n  or GPUs (N to a host): {gpus}") from None
    count, x, hosts = (shape or "1").partition("x")
    hosts = hosts if x else "1"
    if not (count.isdigit() and 1 <= int(count) <= MAX_GPUS_PER_HOST) or not (
        hosts.isdigit() and int(hosts) >= 1
    ):
        raise ValueError(
            f"{text!r}: GPUs are {kind}:N or {kind}:NxHOSTS, N GPUs to a host "
            f"(1 to {MAX_GPUS_PER_HOST}), e.g. {kind}:8x4 for 4 hosts of 8"
        )
    return GpuTopology(GPU_KINDS[kind], int(count), int(hosts))


def describe(text: str) -> TpuSlice:
    """The slice an accelerator type (`v5p-128`) or a topology (`v5p:4x4x4`) names."""
    if ":" not in text:
        return tpu_slice(text)
    topo = parse_topology(text)
    return tpu_slice(topo.accelerator_type, topo.shape)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:] or ["v4-32", "v5p-128", "v5litepod-8", "v5litepod-16", "v6e-256"]:
        try:
            print(describe(arg))
        except ValueError as e:
            sys.exit(f"error: {e}")
