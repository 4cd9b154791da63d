"""The GPU kernels of the linear recurrence in Mosaic GPU (Pallas's Hopper backend), for the
LRU's case: a time-invariant (N,) decay and N a multiple of 128 (lrulm.scan_pallas).

The Triton kernels (lrulm.kernels.gpu) keep a chunk's loads in flight in registers, so
their bytes in flight per SM are capped by the register file and by how many programs
there are (at B=8, N=1024: 256 one-warp programs, ~2 per SM, 57% of the copy bandwidth
on an H200). Here the loads are TMA copies into shared memory, `stages` chunks deep, so
what is in flight no longer depends on registers or threads:

- One program is one warpgroup (128 threads) that owns one row and 128 channels, a
  thread per channel, and walks the sequence in chunks of `chunk` steps with its state in
  float32 registers. Chunk k + stages is copied (TMA) into the ring slot chunk k has just
  been scanned from, while chunks k + 1 .. k + stages - 1 are already on their way; every
  h row is written to a shared-memory slot of a two-slot output ring, and the slot is
  copied out (TMA) as a whole while the next chunk fills the other.
- A (B, L) keep mask (document resets) is one more stream, of one scalar per step; it is
  padded to whole chunks outside the kernel (1/N of b's bytes), since a copy must move a
  multiple of 128 bytes (32 float32 or 64 bfloat16 steps).
- A sequence that is not a whole number of chunks ends with a shorter tail, copied and
  scanned after the ring has drained (no padding of b or h).
- The backward walks the other way carrying g (the cotangent of b) and sums
  da = sum_t keep_t g_t conj(h_{t-1}) per program: at step t the walk holds g_{t+1} and
  keep_{t+1} from the step before, so the h it needs is h_t, the row it loads with dh_t;
  no shifted loads (the first position pairs g with h0 after the walk).
- h is written over b on request and g always over dh, as the Triton kernels do
  (lrulm.kernels.common.write_over_b): a chunk's rows are stored only after the whole
  chunk was copied in, and the copies in flight are of other chunks. `plgpu.kernel` takes
  no input/output aliases, so the kernels are launched through the mesh-kernel primitive
  under it (jax._src.pallas.mpmd._mpmd_map, which does); a jax without it gets new
  buffers through `plgpu.kernel`.

Pallas's Mosaic GPU interpreter runs these kernels on a CPU (tests/test_scan_pallas_gpu.py);
jax.export lowers them for CUDA on a machine without a GPU.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the mesh-kernel primitive under plgpu.kernel, which alone takes input/output aliases
    from jax._src.pallas.mpmd import _mpmd_map
except ImportError:
    _mpmd_map = None

try:  # a jaxlib built without Mosaic GPU's bindings still runs everything else
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as e:
    plgpu, _IMPORT_ERROR = None, e

from lrulm.kernels.common import Parts, conj, group_refs, mul_conj, write_over_b
from lrulm.kernels.common import step as recurrence_step

CHANNELS = 128  # a warpgroup's threads: one channel each
_COPY_ALIGN = 128  # bytes: a copy's size must be a multiple of the warpgroup's size
_MAX_CHUNK = 256  # the TMA's largest box extent
_SMEM_BYTES = 200 * 1024  # of an H100's 227 KiB per block, leaving room for the rest
_OUT_SLOTS = 2


def supports(a: Parts, b: Parts) -> bool:
    """Whether these kernels take the operands: a time-invariant (N,) a, N a multiple of
    128. The Triton kernels take everything else."""
    return a[0].ndim == 1 and b[0].shape[-1] % CHANNELS == 0


def check_device(devices=None) -> None:
    """Raises a clear error, before anything is lowered, when this jax cannot import Mosaic
    GPU, or when a GPU among `devices` (default: jax.devices(); [] for the interpreter) is
    not a Hopper (sm_90) or newer NVIDIA GPU, which Mosaic GPU needs. Silent where there is
    no GPU (the interpreter; lowering for CUDA from a host)."""
    if plgpu is None:
        raise ValueError(
            f"$LRULM_PALLAS_GPU_TUNING asks for the Mosaic GPU kernels, but this jax cannot "
            f"import them ({_IMPORT_ERROR}). Use a Triton tuning (e.g. 32,1,128,prefetch)."
        )
    for device in devices if devices is not None else jax.devices():
        if device.platform != "gpu":
            continue
        capability = getattr(device, "compute_capability", "")
        try:
            major = int(str(capability).split(".")[0])
        except ValueError:
            major = 0  # ROCm reports none
        if major < 9:
            raise ValueError(
                f"$LRULM_PALLAS_GPU_TUNING asks for the Mosaic GPU kernels, which need a Hopper "
                f"(sm_90) or newer NVIDIA GPU; {device.device_kind} has compute capability "
                f"{capability or 'none'}. Use a Triton tuning (e.g. 32,1,128,prefetch) or unset it."
            )


def _interpret_params():
    try:  # the public name, where this jax has one
        return plgpu.InterpretParams()
    except AttributeError:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()


def _shape(length, chunk, stages, ins, outs, itemsize, keep):
    """(chunk, stages): the chunk within the TMA's limits (with a keep stream, a whole
    number of 128-byte keep copies: 32 float32 or 64 bfloat16 steps); then, until the
    rings of `ins` and `outs` (CHANNELS-wide) rows per step fit in SMEM, fewer input
    slots down to two, shorter chunks, and one slot last."""
    unit = _COPY_ALIGN // itemsize if keep else 1
    chunk = min(_MAX_CHUNK, chunk, pl.next_power_of_2(length))
    chunk = max(unit, chunk - chunk % unit)
    slots = lambda: stages * ins + _out_slots(stages) * outs
    too_big = lambda: slots() * chunk * CHANNELS * itemsize > _SMEM_BYTES
    stages = max(1, stages)
    while stages > 2 and too_big():  # fewer slots, but keep two: one filling, one scanned
        stages -= 1
    while chunk > unit and too_big():
        chunk = max(unit, chunk // 2 - chunk // 2 % unit)
    while stages > 1 and too_big():
        stages -= 1
    return chunk, min(stages, max(1, length // chunk))  # no more slots than whole chunks


def _out_slots(stages: int) -> int:
    """Output slots: two (one being written while the other's copy drains) are enough, as
    a store need not wait for memory, so SMEM goes to the input ring's depth."""
    return min(_OUT_SLOTS, stages)


def _pad_keep(keep: Parts, length: int, chunk: int) -> Parts:
    """keep padded with ones to whole chunks: every chunk's copy, the tail's included,
    is `chunk` values long."""
    padded = pl.cdiv(length, chunk) * chunk
    return tuple(jnp.pad(k, ((0, 0), (0, padded - length)), constant_values=1) for k in keep)


def _stream(*, ins, outs, length, reverse, step, carry):
    """Walks the sequence chunk by chunk through rings of SMEM slots: chunk k + S is
    copied into the input slot chunk k was scanned from (S the input ring's depth), and
    each chunk's outputs are copied out of their own, shallower ring.

    Args:
      ins: (gmem, smem) pairs: gmem(start, count) -> the GMEM view of `count` steps from
        `start`; smem a (slots, chunk, ...) ring, the same depth for every input.
      outs: the same for outputs, written by `step` into the slot and copied out whole.
      step: step(carry, in_rows, out_rows, t) -> carry, for local row t of the slot's
        views (in_rows/out_rows: one SMEM ref per stream for this slot).
      carry: the state before the walk.

    Returns:
      The state after the walk.
    """
    stages, chunk = ins[0][1].shape[:2]
    out_slots = outs[0][1].shape[0]
    num_chunks, tail = divmod(length, chunk)
    order = (lambda i, count: count - 1 - i) if reverse else (lambda i, count: i)

    def start(k):  # first row (in memory order) of walk chunk k
        return length - (k + 1) * chunk if reverse else k * chunk

    def scoped(barriers, tail_barrier):
        def issue(k, slot):
            for gmem, smem in ins:
                plgpu.copy_gmem_to_smem(gmem(start(k), chunk), smem.at[slot], barriers.at[slot])

        def scan(c, slot_ins, slot_outs, count):
            for i in range(count):
                c = step(c, slot_ins, slot_outs, order(i, count))
            plgpu.commit_smem()  # the h rows visible to the TMA; every thread done reading
            return c

        def body(k, c):
            slot, out_slot = k % stages, k % out_slots
            plgpu.barrier_wait(barriers.at[slot])
            # The output slot's copy of chunk k - out_slots must have left SMEM (one copy
            # group per chunk) before the slot is written again.
            plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
            slot_outs = [s.at[out_slot] for _, s in outs]
            c = scan(c, [s.at[slot] for _, s in ins], slot_outs, chunk)
            for (gmem, _), view in zip(outs, slot_outs):
                plgpu.copy_smem_to_gmem(view, gmem(start(k), chunk), commit_group=False)
            plgpu.commit_smem_to_gmem_group()

            @pl.when(k + stages < num_chunks)
            def _():
                issue(k + stages, slot)

            return c

        c = carry
        if num_chunks:
            for slot in range(stages):
                issue(slot, slot)
            c = jax.lax.fori_loop(0, num_chunks, body, c)
        if tail:
            first = 0 if reverse else num_chunks * chunk
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for gmem, smem in ins:
                # A keep stream (rank 1 per slot) is padded to whole chunks: copy a chunk.
                count = tail if smem.ndim > 2 else chunk
                view = smem.at[0, pl.ds(0, count)] if smem.ndim > 2 else smem.at[0]
                plgpu.copy_gmem_to_smem(gmem(first, count), view, tail_barrier.at[0])
            plgpu.barrier_wait(tail_barrier.at[0])
            slot_outs = [s.at[0, pl.ds(0, tail)] for _, s in outs]
            c = scan(c, [s.at[0] for _, s in ins], slot_outs, tail)
            for (gmem, _), view in zip(outs, slot_outs):
                plgpu.copy_smem_to_gmem(view, gmem(first, tail), commit_group=False)
            plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)
        return c

    return pl.run_scoped(
        scoped,
        plgpu.Barrier(num_arrivals=len(ins), num_barriers=stages),
        plgpu.Barrier(num_arrivals=len(ins), num_barriers=1),
    )


def _load_vectors(refs_and_views):
    """Copies small per-program (CHANNELS,) vectors (a, h0) into SMEM, waits, and returns
    them as float32 values."""

    def scoped(*scratch):
        *smem, barrier = scratch
        for (gmem, _), s in zip(refs_and_views, smem):
            plgpu.copy_gmem_to_smem(gmem, s, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        return tuple(s[...].astype(jnp.float32) for s in smem)

    shapes = [plgpu.SMEM((CHANNELS,), dtype) for _, dtype in refs_and_views]
    return pl.run_scoped(
        scoped, *shapes, plgpu.Barrier(num_arrivals=len(refs_and_views), num_barriers=1)
    )


def _rings(stages, chunk, dtype, count, keep=()):
    """SMEM for `count` CHANNELS-wide streams (and the keep streams): `stages` slots of
    `chunk` steps each."""
    return [plgpu.SMEM((stages, chunk, CHANNELS), dtype) for _ in range(count)] + [
        plgpu.SMEM((stages, chunk), k.dtype) for k in keep
    ]


def _program(blocks):
    """(row, channel slice) of the current program."""
    p = jax.lax.axis_index("p")
    return p // blocks, pl.ds((p % blocks) * CHANNELS, CHANNELS)


def _sequence_view(ref, row, cols):
    """gmem(start, count) for _stream: `count` steps of one row's channel block."""
    return lambda start, count: ref.at[row, pl.ds(start, count), cols]


def _keep_view(ref, row):
    return lambda start, count: ref.at[row, pl.ds(start, count)]


def aliasing() -> bool:
    """Whether this jax can write h over b (and g over dh) in these kernels."""
    if _mpmd_map is None:
        return False
    return "input_output_aliases" in inspect.signature(_mpmd_map).parameters


def _launch(kernel, rows, n, out_type, interpret, aliases, name):
    """The kernel over rows * N/128 programs (the named grid axis "p": the interpreter
    gives every program the same pl.program_id), with `aliases` {operand: result} where
    this jax can (`aliasing()`)."""
    # Pallas would put a warpgroup barrier before and after every SMEM store (4 per step
    # of a complex scan). The kernels synchronise where it is needed themselves: after a
    # copy's barrier wait (each thread waits), and in commit_smem / wait_smem_to_gmem (a
    # warpgroup barrier each) before a slot is copied out, refilled or written again; no
    # thread reads SMEM it wrote.
    params = plgpu.CompilerParams(unsafe_no_auto_barriers=True)
    grid, grid_names = (rows * (n // CHANNELS),), ("p",)
    interpret = _interpret_params() if interpret else False
    if not aliasing():
        return plgpu.kernel(
            kernel,
            out_type=out_type,
            grid=grid,
            grid_names=grid_names,
            compiler_params=params,
            interpret=interpret or None,
        )
    return _mpmd_map(
        [(plgpu.Mesh(grid=grid, grid_names=grid_names), kernel)],
        out_type,
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )


def forward(a, b, h0, keep, *, chunk, reverse, interpret, stages=3, over_b=False) -> Parts:
    """h_t = a * (keep_t h_{t-1}) + b_t for an (N,) a: b parts (rows, L, N), h0 (rows, N),
    keep () or ((rows, L),). `over_b`: h written over b (lrulm.kernels.common.write_over_b)."""
    rows, length, n = b[0].shape
    num_parts, num_keep, dtype = len(b), len(keep), b[0].dtype
    chunk, stages = _shape(length, chunk, stages, num_parts, num_parts, dtype.itemsize, num_keep)
    keep = _pad_keep(keep, length, chunk)

    def kernel(*refs):
        a_refs, b_refs, h0_refs, keep_refs, h_refs = group_refs(
            refs, (num_parts,) * 3 + (num_keep,)
        )
        row, cols = _program(n // CHANNELS)
        vectors = _load_vectors(
            [(x.at[cols], x.dtype) for x in a_refs] + [(x.at[row, cols], x.dtype) for x in h0_refs]
        )
        a_vec, h = vectors[:num_parts], vectors[num_parts:]

        def step(h, slot_ins, slot_outs, t):
            bt = tuple(x[t].astype(jnp.float32) for x in slot_ins[:num_parts])
            if num_keep:
                kt = slot_ins[num_parts][t].astype(jnp.float32)
                h = tuple(kt * x for x in h)
            h = recurrence_step(h, a_vec, bt)
            for ref, x in zip(slot_outs, h):
                ref[t] = x.astype(ref.dtype)
            return h

        def scoped(*smem):
            b_smem, keep_smem, h_smem = group_refs(smem, (num_parts, num_keep))
            _stream(
                ins=[(_sequence_view(x, row, cols), s) for x, s in zip(b_refs, b_smem)]
                + [(_keep_view(x, row), s) for x, s in zip(keep_refs, keep_smem)],
                outs=[(_sequence_view(x, row, cols), s) for x, s in zip(h_refs, h_smem)],
                length=length,
                reverse=reverse,
                step=step,
                carry=h,
            )

        pl.run_scoped(
            scoped,
            *_rings(stages, chunk, dtype, num_parts, keep),
            *_rings(_out_slots(stages), chunk, dtype, num_parts),
        )

    out_type = [jax.ShapeDtypeStruct(b[0].shape, dtype)] * num_parts
    aliases = write_over_b(num_parts) if over_b else {}
    launch = _launch(kernel, rows, n, out_type, interpret, aliases, "linear_scan_mosaic_gpu")
    return tuple(launch(*a, *b, *h0, *keep))


def backward(a, dh, h, h0, keep, *, chunk, reverse, interpret, stages=3):
    """The fused backward of `forward` (lrulm.kernels.gpu.backward's contract for an (N,)
    a): returns (g parts (rows, L, N), written over dh, and da parts (rows, N), per-row
    partial sums)."""
    rows, length, n = dh[0].shape
    num_parts, num_keep, dtype = len(dh), len(keep), dh[0].dtype
    chunk, stages = _shape(
        length, chunk, stages, 2 * num_parts, num_parts, dtype.itemsize, num_keep
    )
    keep = _pad_keep(keep, length, chunk)

    def kernel(*refs):
        sizes = (num_parts,) * 4 + (num_keep, num_parts)
        a_refs, dh_refs, h_refs, h0_refs, keep_refs, g_refs, da_refs = group_refs(refs, sizes)
        row, cols = _program(n // CHANNELS)
        vectors = _load_vectors(
            [(x.at[cols], x.dtype) for x in a_refs] + [(x.at[row, cols], x.dtype) for x in h0_refs]
        )
        a_conj, h_init = conj(vectors[:num_parts]), vectors[num_parts:]

        def step(carry, slot_ins, slot_outs, t):
            g, k_next, da = carry  # g_{t+1}, keep_{t+1} in the forward's order
            dht = tuple(x[t].astype(jnp.float32) for x in slot_ins[:num_parts])
            ht = tuple(x[t].astype(jnp.float32) for x in slot_ins[num_parts : 2 * num_parts])
            if num_keep:
                g = tuple(k_next * x for x in g)  # keep_{t+1} g_{t+1}
            da = tuple(x + y for x, y in zip(da, mul_conj(g, ht)))
            g = recurrence_step(g, a_conj, dht)
            for ref, x in zip(slot_outs, g):
                ref[t] = x.astype(ref.dtype)
            k_next = slot_ins[-1][t].astype(jnp.float32) if num_keep else k_next
            return g, k_next, da

        def scoped(*smem):
            dh_smem, h_smem, keep_smem, g_smem, da_smem = group_refs(
                smem, (num_parts, num_parts, num_keep, num_parts)
            )
            # Zeros in a loaded row's register layout (a loop carry keeps its layout; a
            # constant's is a splat), from a's real part: a decay, always finite.
            zeros = (0.0 * vectors[0],) * num_parts
            g, k_first, da = _stream(
                ins=[(_sequence_view(x, row, cols), s) for x, s in zip(dh_refs, dh_smem)]
                + [(_sequence_view(x, row, cols), s) for x, s in zip(h_refs, h_smem)]
                + [(_keep_view(x, row), s) for x, s in zip(keep_refs, keep_smem)],
                outs=[(_sequence_view(x, row, cols), s) for x, s in zip(g_refs, g_smem)],
                length=length,
                reverse=not reverse,
                step=step,
                carry=(zeros, jnp.float32(1), zeros),
            )
            if num_keep:
                g = tuple(k_first * x for x in g)
            da = tuple(x + y for x, y in zip(da, mul_conj(g, h_init)))
            for s, x in zip(da_smem, da):
                s[...] = x
            plgpu.commit_smem()
            for ref, s in zip(da_refs, da_smem):
                plgpu.copy_smem_to_gmem(s, ref.at[row, cols], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            *_rings(stages, chunk, dtype, 2 * num_parts, keep),
            *_rings(_out_slots(stages), chunk, dtype, num_parts),
            *[plgpu.SMEM((CHANNELS,), jnp.float32) for _ in range(num_parts)],
        )

    out_type = [jax.ShapeDtypeStruct(dh[0].shape, dtype)] * num_parts
    out_type += [jax.ShapeDtypeStruct((rows, n), jnp.float32)] * num_parts
    aliases = write_over_b(num_parts)  # g over dh (dh is operands num_parts..)
    launch = _launch(kernel, rows, n, out_type, interpret, aliases, "linear_scan_mosaic_gpu_bwd")
    out = launch(*a, *dh, *h, *h0, *keep)
    return tuple(out[:num_parts]), tuple(out[num_parts:])
