"""The device mesh, logical axis rules, and the shardings they give arrays.

Mesh axes, outermost first: data, fsdp, sequence, tensor. `tensor` is innermost so
tensor-parallel collectives stay between neighbouring chips. Multi-slice (DCN) runs
put the `dcn_*` factors outside: the data axis spans slices, everything else within.

Every parameter and activation carries logical axis names (lrulm.layers.param); the
rules below map them to mesh axes. A logical axis whose size is not divisible by its
mesh axes is replicated instead (small vectors on large meshes).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axes (None = replicated). Parameters and activations share it.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # activations: batch over every data-parallel axis
    ("data_batch", "data"),  # a batch over the data axis alone (fsdp kept for a width)
    ("length", "sequence"),  # activations: sequence parallelism
    ("embed", "fsdp"),  # parameters: FSDP shards the model width
    ("state", "tensor"),  # LRU state channels: tensor parallelism
    ("mlp", "tensor"),  # GLU / MLP hidden width
    ("vocab", "tensor"),  # embedding rows and logits
    ("layers", None),  # the scanned depth axis
    ("act_embed", None),  # activations' model width: replicated within a replica
    ("act_state", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def _axis_sizes(spec: dict[str, int], num_devices: int) -> dict[str, int]:
    sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        given = " and ".join(f"mesh.{axis}=-1" for axis in rest)
        keep = "sequence" if "sequence" in rest else rest[-1]
        others = ", ".join(f"mesh.{axis}=1" for axis in rest if axis != keep)
        default = " (mesh.data defaults to -1)" if "data" in rest else ""
        raise ValueError(
            f"only one mesh axis may be -1 (the rest); got {given}{default}: give the others "
            f"a size, e.g. --config.{others.replace(', ', ' --config.')}"
        )
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis}={size}; use a positive size or -1 for the rest")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ValueError(
                f"mesh sizes {sizes} leave {num_devices} devices / {known} = "
                f"{num_devices / known:g} for mesh.{rest[0]}=-1; make the other axes divide "
                f"{num_devices}"
            )
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh sizes {sizes} multiply to {known} but there are {num_devices} devices; "
            "make them multiply to the device count or set one axis to -1"
        )
    return sizes


def make_mesh(
    spec: dict[str, int],
    devices: Sequence[jax.Device] | None = None,
    dcn: dict[str, int] | None = None,
) -> Mesh:
    """Builds the (data, fsdp, sequence, tensor) mesh.

    Args:
      spec: sizes per axis within a slice (ICI), -1 for "the rest".
      devices: the devices to use (default: all); e.g. a TPU topology's for AOT compiles.
      dcn: optional sizes per axis across slices (multi-slice); the product is the
        number of slices, and the total size of an axis is ici * dcn.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_sizes = {axis: int((dcn or {}).get(axis, 1)) for axis in MESH_AXES}
    num_slices = math.prod(dcn_sizes.values())
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices cannot form {num_slices} slices (mesh.dcn_*)")
    ici = _axis_sizes(spec, len(devices) // num_slices)
    shape = tuple(ici[a] for a in MESH_AXES)
    from jax.experimental import mesh_utils

    if num_slices > 1:
        dcn_shape = tuple(dcn_sizes[a] for a in MESH_AXES)
        # TPU slices, or else (GPU or CPU hosts) processes, are what DCN connects.
        by_slice = all(d.platform == "tpu" for d in devices)
        granule = "TPU slice" if by_slice else "process"
        count = len({d.slice_index if by_slice else d.process_index for d in devices})
        if count != num_slices:
            plural = granule + ("es" if granule == "process" else "s")
            where = f"one {granule}" if count == 1 else f"{count} {plural}"
            fix = (
                "set mesh.dcn_data and mesh.dcn_fsdp to 1 (a multi-slice mesh needs "
                f"several {plural})"
                if count == 1
                else f"make mesh.dcn_data x mesh.dcn_fsdp {count}, or both 1"
            )
            raise ValueError(
                f"mesh.dcn_data x mesh.dcn_fsdp = {num_slices}, but the {len(devices)} "
                f"devices are in {where}, what DCN connects here: {fix}"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            shape, dcn_shape, devices, process_is_granule=not by_slice
        )
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def spec_for(
    logical_axes: Sequence[str | None] | None,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    rules=RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes (replicating indivisible dims)."""
    if logical_axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        # Drop mesh axes already used by an earlier dim or of size 1.
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if shape is not None and axes and shape[i] % size:
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_axes_tree(state: nnx.State):
    """The pure-dict tree of logical axes of an nnx.State (None where unannotated)."""

    def axes(v):
        return v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None

    leaves = jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(leaves) if isinstance(leaves, nnx.State) else leaves


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of arrays given a parallel tree of logical axes."""

    leaves, treedef = jax.tree.flatten(abstract_tree)
    axes = treedef.flatten_up_to(axes_tree)  # the axes tree may end in tuples and None
    shardings = [
        NamedSharding(mesh, spec_for(a, mesh, x.shape, rules)) for x, a in zip(leaves, axes)
    ]
    return treedef.unflatten(shardings)


def indivisible(abstract_tree, axes_tree, mesh: Mesh, rules=RULES) -> list[tuple]:
    """The arrays that the rules would split over a mesh axis but `spec_for` keeps whole
    there, because the dimension does not divide by the axis's size: a list of
    (path, shape, dimension, mesh axes, their size)."""
    found = []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
    axes = treedef.flatten_up_to(axes_tree)
    for (path, x), names in zip(leaves, axes):
        wanted = spec_for(names, mesh, None, rules)  # what the rules ask for, sizes aside
        got = spec_for(names, mesh, x.shape, rules)
        for dim, (w, g) in enumerate(zip(wanted, got)):
            if w is not None and g is None:
                mesh_axes = (w,) if isinstance(w, str) else tuple(w)
                size = math.prod(mesh.shape[a] for a in mesh_axes)
                found.append((jax.tree_util.keystr(path), x.shape, dim, mesh_axes, size))
    return found


def indivisible_warning(abstract_params, axes_tree, mesh: Mesh, share: float = 0.05) -> str:
    """A warning when more than `share` of the parameters' bytes stay whole on a mesh axis
    meant to split them (`indivisible`): such a run holds that much more memory per
    device than its mesh suggests. "" when they do not."""
    found = indivisible(abstract_params, axes_tree, mesh)
    nbytes = lambda shape: math.prod(shape) * 4
    total = sum(nbytes(x.shape) for x in jax.tree.leaves(abstract_params))
    whole = {path: shape for path, shape, *_ in found}
    lost = sum(nbytes(shape) for shape in whole.values())
    if not found or lost <= share * total:
        return ""
    found.sort(key=lambda f: -nbytes(f[1]))
    examples = "; ".join(
        f"{path} {tuple(shape)}: dimension {dim} ({shape[dim]}) over {'x'.join(axes)}={size}"
        for path, shape, dim, axes, size in found[:3]
    )
    return (
        f"{len(whole)} parameter arrays ({lost / total:.0%} of the parameters' bytes) are "
        "not split over the mesh axes meant to split them, because their sizes do not "
        f"divide: {examples}. Each device holds them whole; choose model widths that divide "
        "by mesh.fsdp and mesh.tensor, or smaller mesh sizes"
    )


# -- activation constraints ---------------------------------------------------------------

_ctx = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=RULES):
    """Within this context, `constrain` pins activations to the mesh by the rules."""
    previous = getattr(_ctx, "value", None)
    _ctx.value = (mesh, rules) if mesh is not None else None
    try:
        yield
    finally:
        _ctx.value = previous


def current_mesh() -> Mesh | None:
    value = getattr(_ctx, "value", None)
    return value[0] if value else None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; the identity outside a mesh context."""
    value = getattr(_ctx, "value", None)
    if value is None:
        return x
    mesh, rules = value
    spec = spec_for(logical_axes, mesh, x.shape, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int, *, seq_sharded: bool = False) -> NamedSharding:
    """Sharding of an input batch (b, l, ...): batch over data axes, length optional."""
    axes = ["batch"] + (["length"] if seq_sharded else [None]) + [None] * (ndim - 2)
    return NamedSharding(mesh, spec_for(axes[:ndim], mesh))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def process_rows(batch_sharding, global_shape) -> tuple[int, int]:
    """(first row, number of rows) of the global batch this process's devices hold."""
    rows = set()
    for index in batch_sharding.addressable_devices_indices_map(global_shape).values():
        r = index[0]
        rows.add((r.start or 0, global_shape[0] if r.stop is None else r.stop))
    lo, hi = min(a for a, _ in rows), max(b for _, b in rows)
    covered = sum(b - a for a, b in sorted(rows))
    if covered != hi - lo:
        raise ValueError(f"this process's batch rows {sorted(rows)} are not contiguous")
    return lo, hi - lo
