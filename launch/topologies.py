"""TPU accelerator types -> chips, hosts, chips per host, GKE labels: the one table launchers use.

Sources (Cloud TPU docs, "TPU v4/v5e/v5p/v6e" and "Plan TPUs in GKE"):
- v4 and v5p names count TensorCores (2 per chip): v5p-128 is 64 chips. Every host has 4 chips;
  slices are 3D (v5p-128 = 4x4x4 on 16 hosts).
- v5e (v5litepod) and v6e names count chips. Up to 8 chips fit one host (v5litepod-8 and v6e-8
  are single-host 2x4 VMs); multi-host slices use 4-chip VMs (v5litepod-16 = 4x4 on 4 hosts).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Generation:
    """Per-generation facts.

    Attributes:
      cores_per_chip: What the number in the accelerator type counts, per chip.
      dims: 3 for a 3D torus (v4, v5p), 2 for a 2D torus (v5e, v6e).
      max_single_host_chips: Largest slice that fits on one VM.
      gke_accelerator: Value of the `cloud.google.com/gke-tpu-accelerator` node label.
      runtime_version: TPU VM software version for `gcloud compute tpus tpu-vm create`.
      machine_prefix: GKE machine type without the chip-count suffix (`-4t`).
    """

    cores_per_chip: int
    dims: int
    max_single_host_chips: int
    gke_accelerator: str
    runtime_version: str
    machine_prefix: str


GENERATIONS = {
    "v4": Generation(2, 3, 4, "tpu-v4-podslice", "tpu-ubuntu2204-base", "ct4p-hightpu"),
    "v5p": Generation(2, 3, 4, "tpu-v5p-slice", "v2-alpha-tpuv5", "ct5p-hightpu"),
    "v5litepod": Generation(
        1, 2, 8, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite", "ct5lp-hightpu"
    ),
    "v6e": Generation(1, 2, 8, "tpu-v6e-slice", "v2-alpha-tpuv6e", "ct6e-standard"),
}
# Multi-host v5e/v6e slices are built from 4-chip VMs; v4/v5p hosts always have 4 chips.
MULTI_HOST_CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice, as launchers need it.

    Attributes:
      accelerator_type: e.g. "v5p-128".
      generation: e.g. "v5p".
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


def default_topology(chips: int, dims: int) -> str:
    """The usual near-cubic (or near-square) shape for a power-of-two chip count.

    Doubles the last of the smallest dimensions: 3D gives 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4,
    4x4x8, ...; 2D gives 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ...

    Args:
      chips: Number of chips, a power of two.
      dims: 2 or 3.

    Returns:
      The topology string, e.g. "4x4x4".
    """
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips is not a power of two; pass the topology explicitly")
    shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, d in enumerate(shape) if d == smallest)
        shape[last] *= 2
    return "x".join(map(str, shape))


def tpu_slice(accelerator_type: str, topology: str | None = None) -> TpuSlice:
    """Describes a slice from its accelerator type (`v5p-128`, `v5litepod-16`, `v6e-64`, ...).

    Args:
      accelerator_type: `<generation>-<count>`; `v5e-N` is accepted for `v5litepod-N`.
      topology: Chip arrangement, for slices whose shape is not the default (e.g. "4x4x12").

    Returns:
      The slice description.

    Raises:
      ValueError: unknown generation, malformed name, or a topology with the wrong chip count.
    """
    name, _, count = accelerator_type.rpartition("-")
    name = {"v5e": "v5litepod"}.get(name, name)
    if name not in GENERATIONS or not count.isdigit():
        known = ", ".join(f"{g}-N" for g in GENERATIONS)
        raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}; use one of {known}")
    gen = GENERATIONS[name]
    chips = max(int(count) // gen.cores_per_chip, 1)
    if topology is None:
        topology = default_topology(chips, gen.dims)
    elif math.prod(int(d) for d in topology.split("x")) != chips:
        raise ValueError(
            f"topology {topology} does not have the {chips} chips of {accelerator_type}"
        )
    if chips <= gen.max_single_host_chips:
        hosts, per_host = 1, chips
    else:
        hosts, per_host = chips // MULTI_HOST_CHIPS_PER_HOST, MULTI_HOST_CHIPS_PER_HOST
    return TpuSlice(
        accelerator_type=f"{name}-{count}",
        generation=name,
        chips=chips,
        hosts=hosts,
        chips_per_host=per_host,
        topology=topology,
        gke_accelerator=gen.gke_accelerator,
        machine_type=f"{gen.machine_prefix}-{per_host}t",
        runtime_version=gen.runtime_version,
    )


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:] or ["v4-32", "v5p-128", "v5litepod-8", "v5litepod-16", "v6e-256"]:
        print(tpu_slice(arg))
