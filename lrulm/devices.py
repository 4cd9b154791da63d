"""Compile-only devices for targets this machine need not have: the chips of a TPU slice
(from libtpu) and the GPUs of CUDA hosts (from jax's CUDA plugin), for jax's ahead-of-time
path (`lrulm compile`, tools/tpu_fit_table.py, tools/gpu_sass.py). The targets themselves
(names, shapes, cards) are lrulm.topologies'.
"""

from __future__ import annotations

import os
import sys

from lrulm.topologies import GpuTopology, Topology

# ==========================================================================================
# TPU devices, from libtpu (generations and topology names: lrulm.topologies).
# ==========================================================================================


def _quiet_libtpu() -> None:
    """Environment for libtpu on a machine without TPUs, set before it loads.

    Without these it queries the GCE metadata server and warns that it cannot find
    TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES; the values only describe "this host" and
    do not change the compiled topology. ALLOW_MULTIPLE_LIBTPU_LOAD lets several
    compiling processes (tests, the fit table) run at once: nothing here opens a chip.
    """
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # fmt: skip
        os.environ.setdefault(key, value)


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
    """The compile-only devices of `num_slices` slices of this topology."""
    _quiet_libtpu()
    from jax.experimental import topologies

    kwargs = dict(topology.generation.topology_kwargs)
    if topology.chips < 4:  # a single-chip host (v5e-1, v6e-1)
        kwargs["chips_per_host_bounds"] = [1, 1, 1]
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        desc = topologies.get_topology_desc(topology.name, platform="tpu", **kwargs)
    except RuntimeError as e:  # no libtpu, or a shape libtpu rejects
        hint = " (pip install -e '.[tpu]': libtpu)" * ("not installed" in str(e))
        raise ValueError(f"cannot describe TPU topology {topology.name}: {e}{hint}") from e
    return list(desc.devices)


# ==========================================================================================
# GPUs, compiled for without one: jax's CUDA plugin describes them (deviceless).
# ==========================================================================================

PLUGIN_ENV = "LRULM_JAX_CUDA_PLUGIN"


def gpu_devices(topology: GpuTopology) -> list:
    """Compile-only devices for GPUs this machine need not have.

    jax's CUDA plugin provides them; installed into the environment it would try to open
    a GPU at every start, so it may live in a folder of its own ($LRULM_JAX_CUDA_PLUGIN,
    from `pip install --target`), which joins sys.path here. Its start-up check of the
    local GPU's CUDA libraries is skipped (none is used), and without JAX_PLATFORMS set
    jax runs on the CPU (nothing runs: only the compile is wanted).

    XLA's compile also compiles the Mosaic GPU kernels (the plugin's custom call does,
    when XLA instantiates it: Mosaic's passes, LLVM's PTX, ptxas, and its host-side
    launcher JIT-linked against Mosaic's runtime library). jax points Mosaic at that
    library when `jax.experimental.mosaic.gpu` is first imported with the plugin on the
    path; imported before this (lrulm.kernels.mosaic_gpu, at import), it had none, so it
    is pointed at here (`_point_mosaic_at_its_runtime`).
    """
    import jax

    if (path := os.environ.get(PLUGIN_ENV)) and path not in sys.path:
        sys.path.append(path)
    _point_mosaic_at_its_runtime()
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="cuda",
            target_config=topology.generation.target_config(),
            topology=f"1x{topology.hosts}x{topology.count}",  # slices x hosts x GPUs
        )
    except (NotImplementedError, RuntimeError) as e:
        import jaxlib

        raise ValueError(
            f"compiling for {topology.name} without a GPU needs jax's CUDA plugin ({e}): "
            f"pip install --target DIR jax-cuda12-plugin=={jaxlib.__version__}, then "
            f"{PLUGIN_ENV}=DIR lrulm compile ..."
        ) from None
    return list(desc.devices)


MOSAIC_RUNTIME_ENV = "MOSAIC_GPU_RUNTIME_LIB_PATH"


def _point_mosaic_at_its_runtime() -> None:
    """Sets $MOSAIC_GPU_RUNTIME_LIB_PATH, unless set, to the CUDA plugin's Mosaic GPU
    runtime (libmosaic_gpu_runtime.so beside jax_cuda1x_plugin's extension), as importing
    jax.experimental.mosaic.gpu does when the plugin is importable then. Without it a
    Mosaic GPU kernel compiles to a cubin and then fails at XLA's compile: "Failed to
    lookup host symbol"."""
    import importlib.util

    if os.environ.get(MOSAIC_RUNTIME_ENV):
        return
    for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for folder in spec.submodule_search_locations if spec else []:
            library = os.path.join(folder, "libmosaic_gpu_runtime.so")
            if os.path.isfile(library):
                os.environ[MOSAIC_RUNTIME_ENV] = library
                return
