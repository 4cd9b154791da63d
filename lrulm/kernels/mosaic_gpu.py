"""The GPU kernels of the linear recurrence in Mosaic GPU (Pallas's Hopper backend), for N a
multiple of 128: the LRU's time-invariant (N,) decay, or a full (rows, L, N) one (an
input-dependent gate, as in Griffin's RG-LRU) (lrulm.scan_pallas).

The Triton kernels (lrulm.kernels.gpu) keep a chunk's loads in flight in registers, so
their bytes in flight per SM are capped by the register file and by how many programs
there are (at B=8, N=1024: 256 one-warp programs, ~2 per SM, 57% of the copy bandwidth
on an H200). Here the loads are TMA copies into shared memory, `stages` chunks deep, so
what is in flight no longer depends on registers or threads:

- One program is one warpgroup (128 threads) that owns one row and 128 channels, a
  thread per channel, and walks the sequence in chunks of `chunk` steps with its state in
  float32 registers, through a ring of `stages` shared-memory slots filled by TMA
  copies. Each h row is written over its b row in the slot, and the slot is copied out
  (TMA) from there: no output buffers, so all of SMEM goes to chunks in flight (while
  the walk waits for chunk k, chunks k .. k + stages - 2 are on their way). Once chunk k
  is scanned, the slot of chunk k - 1, whose copy out has had chunk k's scan to leave
  SMEM, is refilled with chunk k - 1 + stages.
- A (B, L) keep mask (document resets) is one more stream, of one scalar per step; it is
  padded to whole chunks outside the kernel (1/N of b's bytes), since a copy must move a
  multiple of 128 bytes (32 float32 or 64 bfloat16 steps).
- A sequence that is not a whole number of chunks ends with a shorter tail, copied and
  scanned after the ring has drained (no padding of b or h).
- The backward walks the other way carrying g (the cotangent of b) and sums
  da = sum_t keep_t g_t conj(h_{t-1}) per program: at step t the walk holds g_{t+1} and
  keep_{t+1} from the step before, so the h it needs is h_t, the row it loads with dh_t;
  no shifted loads (the first position pairs g with h0 after the walk).
- A full a is one more stream of the ring, beside b (forward) or in place of h
  (backward, which carries a_{t+1} from the step before as it does keep_{t+1}). Its da
  is per step, da_t = keep_t g_t conj(h_{t-1}), and would be stored one row away from
  the row the walk is on (across a chunk's edge, into a slot already copied out); it is
  one elementwise XLA fusion after the kernel instead (read g and h, write da: the
  kernel itself reads no h).
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


def supports(a: Parts, b: Parts) -> bool:
    """Whether these kernels take the operands: N a multiple of 128 (a of shape (N,) or
    b's). The Triton kernels take the rest."""
    del a
    return b[0].shape[-1] % CHANNELS == 0


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


def _shape(length, chunk, stages, streams, itemsize, keep):
    """(chunk, stages): the chunk within the TMA's limits (with a keep stream, a whole
    number of 128-byte keep copies: 32 float32 or 64 bfloat16 steps); then, until the
    ring of `streams` CHANNELS-wide rows per step fits in SMEM, fewer slots down to two
    (one scanned, one filling), then shorter chunks. Two slots of the largest kernel (a
    complex backward: 4 streams, 32 float32 steps with resets) take 128 KiB."""
    unit = _COPY_ALIGN // itemsize if keep else 1
    chunk = min(_MAX_CHUNK, chunk, pl.next_power_of_2(length))
    chunk = max(unit, chunk - chunk % unit)
    too_big = lambda: stages * streams * chunk * CHANNELS * itemsize > _SMEM_BYTES
    stages = max(2, stages)
    while stages > 2 and too_big():
        stages -= 1
    while chunk > unit and too_big():
        chunk = max(unit, chunk // 2 - chunk // 2 % unit)
    return chunk, min(stages, max(1, length // chunk))  # no more slots than whole chunks


def _pad_keep(keep: Parts, length: int, chunk: int) -> Parts:
    """keep padded with ones to whole chunks: every chunk's copy, the tail's included,
    is `chunk` values long."""
    padded = pl.cdiv(length, chunk) * chunk
    return tuple(jnp.pad(k, ((0, 0), (0, padded - length)), constant_values=1) for k in keep)


def _stream(*, ins, outs, length, reverse, step, carry):
    """Walks the sequence chunk by chunk through a ring of S SMEM slots. A chunk's
    outputs are written over its inputs in the slot and copied out from there, so all of
    SMEM goes to chunks in flight: once chunk k is scanned, its copy out is issued and
    the slot of chunk k - 1 (whose copy out has had chunk k's scan to leave SMEM) is
    refilled with chunk k - 1 + S; while the walk waits for chunk k + 1, chunks
    k + 1 .. k + S - 1 are on their way.

    Args:
      ins: (gmem, smem) pairs: gmem(start, count) -> the GMEM view of `count` steps from
        `start`; smem a (S, chunk, ...) ring, the same depth for every input.
      outs: (i, gmem) pairs: `step` writes an output's rows over input i's in the slot,
        and they are copied from there to gmem(start, count).
      step: step(carry, rows, t) -> carry, for local row t of the slot (rows: one SMEM
        ref per input, read before written at row t).
      carry: the state before the walk.

    Returns:
      The state after the walk.
    """
    stages, chunk = ins[0][1].shape[:2]
    num_chunks, tail = divmod(length, chunk)
    assert stages <= max(1, num_chunks) and (stages > 1 or num_chunks <= 1), (stages, chunk)
    order = (lambda i, count: count - 1 - i) if reverse else (lambda i, count: i)

    def start(k):  # first row (in memory order) of walk chunk k
        return length - (k + 1) * chunk if reverse else k * chunk

    def scoped(barriers, tail_barrier):
        def issue(k, slot):
            for gmem, smem in ins:
                plgpu.copy_gmem_to_smem(gmem(start(k), chunk), smem.at[slot], barriers.at[slot])

        def scan_and_copy_out(c, slot, first, count):
            rows = [smem.at[slot] for _, smem in ins]
            for i in range(count):
                c = step(c, rows, order(i, count))
            plgpu.commit_smem()  # the outputs visible to the TMA; every thread done reading
            for i, gmem in outs:
                view = ins[i][1].at[slot, pl.ds(0, count)]
                plgpu.copy_smem_to_gmem(view, gmem(first, count), commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            return c

        def body(k, c):
            slot = k % stages
            plgpu.barrier_wait(barriers.at[slot])
            c = scan_and_copy_out(c, slot, start(k), chunk)

            @pl.when((k > 0) & (k - 1 + stages < num_chunks))
            def _():
                # One copy group per chunk: chunk k - 1's has left SMEM once at most chunk
                # k's is still reading.
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                issue(k - 1 + stages, (k - 1) % stages)

            return c

        c = carry
        if num_chunks:
            for slot in range(stages):
                issue(slot, slot)
            c = jax.lax.fori_loop(0, num_chunks, body, c)
        if tail:
            first = 0 if reverse else num_chunks * chunk
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # slot 0 copied out
            for gmem, smem in ins:
                # A keep stream (rank 1 per slot) is padded to whole chunks: copy a chunk.
                count = tail if smem.ndim > 2 else chunk
                view = smem.at[0, pl.ds(0, count)] if smem.ndim > 2 else smem.at[0]
                plgpu.copy_gmem_to_smem(gmem(first, count), view, tail_barrier.at[0])
            plgpu.barrier_wait(tail_barrier.at[0])
            c = scan_and_copy_out(c, 0, first, tail)
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


def ring_copy(x: Parts, *, chunk, stages, interpret) -> Parts:
    """x's (rows, L, N) parts copied through the forward's ring: the same programs, TMA
    copies in, slots and copies out, and no scan. What this moves per second is the most
    the ring lets the forward reach (tools/gpu_kernel_sweep.py reports both)."""
    rows, length, n = x[0].shape
    chunk, stages = _shape(length, chunk, stages, len(x), x[0].dtype.itemsize, 0)

    def kernel(*refs):
        x_refs, out_refs = refs[: len(x)], refs[len(x) :]
        row, cols = _program(n // CHANNELS)

        def scoped(*smem):
            _stream(
                ins=[(_sequence_view(r, row, cols), s) for r, s in zip(x_refs, smem)],
                outs=[(i, _sequence_view(r, row, cols)) for i, r in enumerate(out_refs)],
                length=length,
                reverse=False,
                step=lambda c, rows, t: c,
                carry=jnp.int32(0),
            )

        pl.run_scoped(scoped, *_rings(stages, chunk, x[0].dtype, len(x)))

    out_type = [jax.ShapeDtypeStruct(x[0].shape, x[0].dtype)] * len(x)
    return tuple(_launch(kernel, rows, n, out_type, interpret, {}, "ring_copy_mosaic_gpu")(*x))


def forward(a, b, h0, keep, *, chunk, reverse, interpret, stages=3, over_b=False) -> Parts:
    """h_t = a_t * (keep_t h_{t-1}) + b_t: b parts (rows, L, N), a parts (N,) or b's shape,
    h0 (rows, N), keep () or ((rows, L),). `over_b`: h written over b
    (lrulm.kernels.common.write_over_b)."""
    rows, length, n = b[0].shape
    num_parts, num_keep, dtype = len(b), len(keep), b[0].dtype
    full_a = a[0].ndim == 3
    streams = num_parts * (1 + full_a)  # b (and a) rows per step
    chunk, stages = _shape(length, chunk, stages, streams, dtype.itemsize, num_keep)
    keep = _pad_keep(keep, length, chunk)

    def kernel(*refs):
        a_refs, b_refs, h0_refs, keep_refs, h_refs = group_refs(
            refs, (num_parts,) * 3 + (num_keep,)
        )
        row, cols = _program(n // CHANNELS)
        vectors = _load_vectors(
            ([] if full_a else [(x.at[cols], x.dtype) for x in a_refs])
            + [(x.at[row, cols], x.dtype) for x in h0_refs]
        )
        a_vec, h = vectors[:-num_parts], vectors[-num_parts:]

        def step(h, rows, t):  # h_t written over b_t
            bt = tuple(x[t].astype(jnp.float32) for x in rows[:num_parts])
            at = tuple(x[t].astype(jnp.float32) for x in rows[num_parts:streams]) or a_vec
            if num_keep:
                kt = rows[streams][t].astype(jnp.float32)
                h = tuple(kt * x for x in h)
            h = recurrence_step(h, at, bt)
            for ref, x in zip(rows, h):
                ref[t] = x.astype(ref.dtype)
            return h

        def scoped(*smem):
            b_smem, a_smem, keep_smem = group_refs(smem, (num_parts, streams - num_parts))
            sequences = zip(b_refs + (a_refs if full_a else ()), b_smem + a_smem)
            _stream(
                ins=[(_sequence_view(x, row, cols), s) for x, s in sequences]
                + [(_keep_view(x, row), s) for x, s in zip(keep_refs, keep_smem)],
                outs=[(i, _sequence_view(x, row, cols)) for i, x in enumerate(h_refs)],
                length=length,
                reverse=reverse,
                step=step,
                carry=h,
            )

        pl.run_scoped(scoped, *_rings(stages, chunk, dtype, streams, keep))

    out_type = [jax.ShapeDtypeStruct(b[0].shape, dtype)] * num_parts
    aliases = write_over_b(num_parts) if over_b else {}
    launch = _launch(kernel, rows, n, out_type, interpret, aliases, "linear_scan_mosaic_gpu")
    return tuple(launch(*a, *b, *h0, *keep))


def backward(a, dh, h, h0, keep, *, chunk, reverse, interpret, stages=3):
    """The fused backward of `forward` (lrulm.kernels.gpu.backward's contract): returns
    (g parts (rows, L, N), written over dh, and da parts: (rows, N) per-row partial sums
    for an (N,) a, float32 (rows, L, N) for a full one)."""
    rows, length, n = dh[0].shape
    num_parts, num_keep, dtype = len(dh), len(keep), dh[0].dtype
    full_a = a[0].ndim == 3
    chunk, stages = _shape(length, chunk, stages, 2 * num_parts, dtype.itemsize, num_keep)
    padded_keep = _pad_keep(keep, length, chunk)

    def kernel(*refs):
        if full_a:  # neither h nor h0: its da is formed after the kernel
            sizes = (num_parts,) * 2 + (num_keep, num_parts)
            a_refs, dh_refs, keep_refs, g_refs, _ = group_refs(refs, sizes)
        else:
            sizes = (num_parts,) * 4 + (num_keep, num_parts)
            a_refs, dh_refs, h_refs, h0_refs, keep_refs, g_refs, da_refs = group_refs(refs, sizes)
        row, cols = _program(n // CHANNELS)
        if full_a:  # a's first row: what the zeros below take their layout from
            vectors = _load_vectors([(x.at[row, 0, cols], x.dtype) for x in a_refs])
            a_conj, h_init = None, ()
        else:
            vectors = _load_vectors(
                [(x.at[cols], x.dtype) for x in a_refs]
                + [(x.at[row, cols], x.dtype) for x in h0_refs]
            )
            a_conj, h_init = conj(vectors[:num_parts]), vectors[num_parts:]

        def step(carry, rows, t):  # g_t written over dh_t
            g, a_next, k_next, da = carry  # g_{t+1}, a_{t+1}, keep_{t+1} in the forward's order
            dht = tuple(x[t].astype(jnp.float32) for x in rows[:num_parts])
            # h_t (a time-invariant a), or a_t (a full one), loaded with dh_t
            xt = tuple(x[t].astype(jnp.float32) for x in rows[num_parts : 2 * num_parts])
            if num_keep:
                g = tuple(k_next * x for x in g)  # keep_{t+1} g_{t+1}
            if full_a:
                g, a_next = recurrence_step(g, conj(a_next), dht), xt
            else:
                da = tuple(x + y for x, y in zip(da, mul_conj(g, xt)))
                g = recurrence_step(g, a_conj, dht)
            for ref, x in zip(rows, g):
                ref[t] = x.astype(ref.dtype)
            k_next = rows[-1][t].astype(jnp.float32) if num_keep else k_next
            return g, a_next, k_next, da

        def scoped(*smem):
            dh_smem, x_smem, keep_smem, da_smem = group_refs(smem, (num_parts,) * 2 + (num_keep,))
            # Zeros in a loaded row's register layout (a loop carry keeps its layout; a
            # constant's is a splat), from a's real part: a decay, always finite.
            zeros = (0.0 * vectors[0],) * num_parts
            # g starts at zero, so the "next" a and keep of the first walk step do not matter.
            g, _, k_first, da = _stream(
                ins=[(_sequence_view(x, row, cols), s) for x, s in zip(dh_refs, dh_smem)]
                + [
                    (_sequence_view(x, row, cols), s)
                    for x, s in zip(a_refs if full_a else h_refs, x_smem)
                ]
                + [(_keep_view(x, row), s) for x, s in zip(keep_refs, keep_smem)],
                outs=[(i, _sequence_view(x, row, cols)) for i, x in enumerate(g_refs)],
                length=length,
                reverse=not reverse,
                step=step,
                carry=(zeros, zeros, jnp.float32(1), zeros),
            )
            if full_a:
                return
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
            *_rings(stages, chunk, dtype, 2 * num_parts, padded_keep),
            *[plgpu.SMEM((CHANNELS,), jnp.float32) for _ in range(num_parts * (not full_a))],
        )

    out_type = [jax.ShapeDtypeStruct(dh[0].shape, dtype)] * num_parts
    if not full_a:
        out_type += [jax.ShapeDtypeStruct((rows, n), jnp.float32)] * num_parts
    aliases = write_over_b(num_parts)  # g over dh (dh is operands num_parts..)
    launch = _launch(kernel, rows, n, out_type, interpret, aliases, "linear_scan_mosaic_gpu_bwd")
    if not full_a:
        out = launch(*a, *dh, *h, *h0, *padded_keep)
        return tuple(out[:num_parts]), tuple(out[num_parts:])
    g = tuple(launch(*a, *dh, *padded_keep))
    return g, _full_da(g, h, h0, keep, reverse)


def _full_da(g: Parts, h: Parts, h0: Parts, keep: Parts, reverse: bool) -> Parts:
    """da_t = keep_t g_t conj(h_{t-1}) for a full a, h_{t-1} being h0 at the forward's
    first position (the last for `reverse`), in float32: one elementwise pass."""
    f32 = lambda x: x.astype(jnp.float32)
    shift = lambda x, x0: jnp.concatenate(
        [x[:, 1:], x0[:, None]] if reverse else [x0[:, None], x[:, :-1]], axis=1
    )
    da = mul_conj(tuple(map(f32, g)), tuple(shift(f32(x), f32(x0)) for x, x0 in zip(h, h0)))
    return tuple(f32(keep[0])[..., None] * x for x in da) if keep else da
