"""The GPU kernels of the linear recurrence in Mosaic GPU (Pallas's Hopper backend), for N a
multiple of 128 (of 64 with halves=2): the LRU's time-invariant (N,) decay, or a full
(rows, L, N) one (an input-dependent gate, as in Griffin's RG-LRU) (lrulm.scan_pallas).

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
- halves=2: two thread groups of 64 channels a program scan the two halves of every
  chunk at once (each half of a slot its own TMA copy), the second fixed up from the
  first's end state (lrulm.kernels.mosaic_halves): B x N / 64 programs for the same
  bytes (at B=8, N=1024: 128 for 132 SMs instead of 64), for one SMEM exchange and a
  complex multiply-add per row.
- h is written over b on request and g always over dh, as the Triton kernels do
  (lrulm.kernels.common.write_over_b): a chunk's rows are stored only after the whole
  chunk was copied in, and the copies in flight are of other chunks. `plgpu.kernel` takes
  no input/output aliases, so the kernels are launched through the mesh-kernel primitive
  under it (jax._src.pallas.mpmd._mpmd_map, which does); a jax without it gets new
  buffers through `plgpu.kernel`.

Pallas's Mosaic GPU interpreter runs these kernels on a CPU (tests/test_scan_pallas_gpu.py);
jax.export lowers them for CUDA on a machine without a GPU, and jax's CUDA plugin compiles them
there for an H100, to sm_90a machine code (tools/gpu_sass.py reads it).
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

from lrulm.kernels import mosaic_halves as halves_lib
from lrulm.kernels.common import (
    Parts,
    conj,
    full_da,
    group_refs,
    mul_conj,
    out_struct,
    write_over_b,
)
from lrulm.kernels.common import step as recurrence_step

CHANNELS = 128  # a warpgroup's threads: one channel each
_COPY_ALIGN = 128  # bytes: a copy's size must be a multiple of the warpgroup's size
_MAX_CHUNK = 256  # the TMA's largest box extent
# With halves=2 a thread holds its half's local states and decay products in registers
# until the exchange: 4 float32 registers a step for complex values, so 32 steps a half.
_MAX_HALVES_CHUNK = 64
_SMEM_BYTES = 200 * 1024  # of an H100's 227 KiB per block, leaving room for the rest


def supports(a: Parts, b: Parts, halves: int = 1) -> bool:
    """Whether these kernels take the operands: N a multiple of a program's channels
    (128, or 64 with halves=2; a of shape (N,) or b's). The Triton kernels take the rest."""
    del a
    return b[0].shape[-1] % (CHANNELS // halves) == 0


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


def _shape(length, chunk, stages, streams, itemsize, keep, halves=1):
    """(chunk, stages): the chunk within the TMA's limits (with a keep stream, a whole
    number of 128-byte keep copies: 32 float32 or 64 bfloat16 steps; at least one step
    per half, at most _MAX_HALVES_CHUNK with halves=2); then, until the ring of
    `streams` rows of CHANNELS // halves per step fits in SMEM, fewer slots down to two
    (one scanned, one filling), then shorter chunks. Two slots of the largest kernel (a
    complex backward: 4 streams, 32 float32 steps of 128 channels with resets) take
    128 KiB."""
    unit = max(_COPY_ALIGN // itemsize if keep else 1, halves)
    longest = _MAX_CHUNK if halves == 1 else _MAX_HALVES_CHUNK
    chunk = min(longest, chunk, max(unit, pl.next_power_of_2(length)))
    chunk = max(unit, chunk - chunk % unit)
    width = CHANNELS // halves
    too_big = lambda: stages * streams * chunk * width * itemsize > _SMEM_BYTES
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


def _parts(count, halves, reverse):
    """(rows, first SMEM row) of each part of a chunk of `count` steps, in memory order.
    With halves=2 the program's threads are two groups, each scanning one half of the
    chunk: equal halves, the one the walk reaches first longer by one for an odd count.
    A half sits at the end of its SMEM region when the walk runs backwards, so that walk
    step s reads the same row index in both (a shorter half's extra step comes last in
    its walk and is never copied out)."""
    if halves == 1:
        return ((count, 0),)
    small, big = count // 2, count - count // 2
    sizes = (small, big) if reverse else (big, small)
    return tuple((n, big - n if reverse else 0) for n in sizes)


def _stream(*, ins, outs, length, reverse, scan, carry, halves=1):
    """Walks the sequence chunk by chunk through a ring of S SMEM slots. A chunk's
    outputs are written over its inputs in the slot and copied out from there, so all of
    SMEM goes to chunks in flight: once chunk k is scanned, its copy out is issued and
    the slot of chunk k - 1 (whose copy out has had chunk k's scan to leave SMEM) is
    refilled with chunk k - 1 + S; while the walk waits for chunk k + 1, chunks
    k + 1 .. k + S - 1 are on their way.

    Args:
      ins: (gmem, smem) pairs: gmem(start, count) -> the GMEM view of `count` steps from
        `start`; smem a ring of the same depth S for every input: (S, halves,
        chunk / halves, width) for a sequence (each half its own TMA copy), (S, chunk)
        for a keep stream (one scalar a step, padded to whole chunks).
      outs: (i, gmem) pairs: `scan` writes an output's rows over input i's in the slot,
        and they are copied from there to gmem(start, count).
      scan: scan(carry, slot, parts) -> carry: runs one chunk, given one SMEM ref per
        input (the slot) and the chunk's `_parts`.
      carry: the state before the walk.

    Returns:
      The state after the walk.
    """
    stages, chunk = ins[0][1].shape[0], halves * ins[0][1].shape[2]
    num_chunks, tail = divmod(length, chunk)
    assert stages <= max(1, num_chunks) and (stages > 1 or num_chunks <= 1), (stages, chunk)

    def start(k):  # first row (in memory order) of walk chunk k
        return length - (k + 1) * chunk if reverse else k * chunk

    def copies(first, count, slot, barrier, to_smem):
        """Every (gmem, smem) copy of a chunk: in (to_smem) or out (of the outputs)."""
        streams = ins if to_smem else [(gmem, ins[i][1]) for i, gmem in outs]
        for gmem, smem in streams:
            if smem.ndim == 2:  # keep: always a whole (padded) chunk
                plgpu.copy_gmem_to_smem(gmem(first, chunk), smem.at[slot], barrier)
                continue
            row = first
            for j, (n, offset) in enumerate(_parts(count, halves, reverse)):
                if not n:  # the second half of a one-step tail
                    continue
                view = smem.at[slot, j, pl.ds(offset, n)]
                if to_smem:
                    plgpu.copy_gmem_to_smem(gmem(row, n), view, barrier)
                else:
                    plgpu.copy_smem_to_gmem(view, gmem(row, n), commit_group=False)
                row += n

    def arrivals(count):
        parts = sum(1 for n, _ in _parts(count, halves, reverse) if n)
        return sum(1 if smem.ndim == 2 else parts for _, smem in ins)

    def scoped(barriers, tail_barrier):
        def scan_and_copy_out(c, slot, first, count):
            c = scan(c, [smem.at[slot] for _, smem in ins], _parts(count, halves, reverse))
            plgpu.commit_smem()  # the outputs visible to the TMA; every thread done reading
            copies(first, count, slot, None, to_smem=False)
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
                slot = (k - 1) % stages
                copies(start(k - 1 + stages), chunk, slot, barriers.at[slot], to_smem=True)

            return c

        c = carry
        if num_chunks:
            for slot in range(stages):
                copies(start(slot), chunk, slot, barriers.at[slot], to_smem=True)
            c = jax.lax.fori_loop(0, num_chunks, body, c)
        if tail:
            first = 0 if reverse else num_chunks * chunk
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # slot 0 copied out
            copies(first, tail, 0, tail_barrier.at[0], to_smem=True)
            plgpu.barrier_wait(tail_barrier.at[0])
            c = scan_and_copy_out(c, 0, first, tail)
        plgpu.wait_smem_to_gmem(0)
        return c

    return pl.run_scoped(
        scoped,
        plgpu.Barrier(num_arrivals=arrivals(chunk), num_barriers=stages),
        plgpu.Barrier(num_arrivals=arrivals(tail or chunk), num_barriers=1),
    )


def _rows(step, reverse):
    """A `_stream` scan of one part (halves=1) that runs step(carry, rows, t) for each
    row t of the chunk in walk order (rows: the slot's refs, (chunk, CHANNELS) or
    (chunk,) for keep)."""

    def scan(c, slot, parts):
        ((count, _),) = parts
        rows = [ref.at[0] if ref.ndim == 3 else ref for ref in slot]
        for i in range(count):
            c = step(c, rows, count - 1 - i if reverse else i)
        return c

    return scan


def _load_vectors(refs_and_views, halves=1):
    """Copies small per-program arrays into SMEM, waits, and returns them as float32
    values: (width,) vectors (a, h0) as (width,) arrays, or with halves=2 as (2, width)
    ones holding the vector once per half; (2, width) views (the halves' selector) as
    they are."""
    width = CHANNELS // halves
    shape = (halves, width) if halves > 1 else (width,)
    copies = [1 if len(gmem.shape) == len(shape) else halves for gmem, _ in refs_and_views]

    def scoped(*scratch):
        *smem, barrier = scratch
        for (gmem, _), s, count in zip(refs_and_views, smem, copies):
            for j in range(count):
                plgpu.copy_gmem_to_smem(gmem, s.at[j] if count > 1 else s, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        return tuple(s[...].astype(jnp.float32) for s in smem)

    shapes = [plgpu.SMEM(shape, dtype) for _, dtype in refs_and_views]
    barrier = plgpu.Barrier(num_arrivals=sum(copies), num_barriers=1)
    return pl.run_scoped(scoped, *shapes, barrier)


def _rings(stages, chunk, dtype, count, keep=(), halves=1):
    """SMEM for `count` sequence streams (and the keep streams): `stages` slots of
    `chunk` steps each, a sequence's slot in `halves` parts of CHANNELS // halves."""
    shape = (stages, halves, chunk // halves, CHANNELS // halves)
    return [plgpu.SMEM(shape, dtype) for _ in range(count)] + [
        plgpu.SMEM((stages, chunk), k.dtype) for k in keep
    ]


def _program(blocks, width=CHANNELS):
    """(row, channel slice) of the current program."""
    p = jax.lax.axis_index("p")
    return p // blocks, pl.ds((p % blocks) * width, width)


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


def _launch(kernel, programs, out_type, interpret, aliases, name):
    """The kernel over `programs` (the named grid axis "p": the interpreter gives every
    program the same pl.program_id), with `aliases` {operand: result} where this jax can
    (`aliasing()`)."""
    # Pallas would put a warpgroup barrier before and after every SMEM store (4 per step
    # of a complex scan). The kernels synchronise where it is needed themselves: after a
    # copy's barrier wait (each thread waits), and in commit_smem / wait_smem_to_gmem (a
    # warpgroup barrier each) before a slot is copied out, refilled or written again, or
    # an exchange buffer read (mosaic_halves.swap); no thread otherwise reads SMEM that
    # another one wrote.
    params = plgpu.CompilerParams(unsafe_no_auto_barriers=True)
    grid, grid_names = (programs,), ("p",)
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


def ring_copy(x: Parts, *, chunk, stages, interpret, halves=1) -> Parts:
    """x's (rows, L, N) parts copied through the forward's ring: the same programs, TMA
    copies in, slots and copies out, and no scan. What this moves per second is the most
    the ring lets the forward reach (tools/gpu_kernel_sweep.py reports both)."""
    rows, length, n = x[0].shape
    chunk, stages = _shape(length, chunk, stages, len(x), x[0].dtype.itemsize, 0, halves)
    width = CHANNELS // halves

    def kernel(*refs):
        x_refs, out_refs = refs[: len(x)], refs[len(x) :]
        row, cols = _program(n // width, width)

        def scoped(*smem):
            _stream(
                ins=[(_sequence_view(r, row, cols), s) for r, s in zip(x_refs, smem)],
                outs=[(i, _sequence_view(r, row, cols)) for i, r in enumerate(out_refs)],
                length=length,
                reverse=False,
                scan=lambda c, slot, parts: c,
                carry=(),
                halves=halves,
            )

        pl.run_scoped(scoped, *_rings(stages, chunk, x[0].dtype, len(x), halves=halves))

    out_type = [out_struct(x[0].shape, x[0].dtype, x[0])] * len(x)
    launch = _launch(kernel, rows * n // width, out_type, interpret, {}, "ring_copy_mosaic_gpu")
    return tuple(launch(*x))


def forward(
    a, b, h0, keep, *, chunk, reverse, interpret, stages=3, over_b=False, halves=1
) -> Parts:
    """h_t = a_t * (keep_t h_{t-1}) + b_t: b parts (rows, L, N), a parts (N,) or b's shape,
    h0 (rows, N), keep () or ((rows, L),). `over_b`: h written over b
    (lrulm.kernels.common.write_over_b). `halves`: 1, or 2 thread groups per program of
    64 channels (twice the programs)."""
    rows, length, n = b[0].shape
    num_parts, num_keep, dtype = len(b), len(keep), b[0].dtype
    full_a = a[0].ndim == 3
    streams = num_parts * (1 + full_a)  # b (and a) rows per step
    chunk, stages = _shape(length, chunk, stages, streams, dtype.itemsize, num_keep, halves)
    keep = _pad_keep(keep, length, chunk)
    width = CHANNELS // halves
    sel = (halves_lib.selector(width),) if halves > 1 else ()

    def kernel(*refs):
        a_refs, b_refs, h0_refs, keep_refs, sel_refs, h_refs = group_refs(
            refs, (num_parts,) * 3 + (num_keep, len(sel))
        )
        row, cols = _program(n // width, width)
        vectors = _load_vectors(
            ([] if full_a else [(x.at[cols], x.dtype) for x in a_refs])
            + [(x.at[row, cols], x.dtype) for x in h0_refs]
            + [(x, x.dtype) for x in sel_refs],
            halves,
        )
        vectors, selector = vectors[: len(vectors) - len(sel)], vectors[len(vectors) - len(sel) :]
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
            b_smem, a_smem, keep_smem, buffers = group_refs(
                smem, (num_parts, streams - num_parts, num_keep)
            )
            if halves > 1:
                scan = halves_lib.forward_scan(
                    num_parts=num_parts, num_keep=num_keep, full_a=full_a, a_vec=a_vec,
                    sel=selector[0], reverse=reverse, buffers=buffers,
                )  # fmt: skip
            else:
                scan = _rows(step, reverse)
            sequences = zip(b_refs + (a_refs if full_a else ()), b_smem + a_smem)
            _stream(
                ins=[(_sequence_view(x, row, cols), s) for x, s in sequences]
                + [(_keep_view(x, row), s) for x, s in zip(keep_refs, keep_smem)],
                outs=[(i, _sequence_view(x, row, cols)) for i, x in enumerate(h_refs)],
                length=length,
                reverse=reverse,
                scan=scan,
                carry=h,
                halves=halves,
            )

        buffers = halves_lib.swap_buffers(2 * num_parts, width) if halves > 1 else []
        pl.run_scoped(scoped, *_rings(stages, chunk, dtype, streams, keep, halves), *buffers)

    out_type = [out_struct(b[0].shape, dtype, b[0])] * num_parts
    aliases = write_over_b(num_parts) if over_b else {}
    programs = rows * n // width
    launch = _launch(kernel, programs, out_type, interpret, aliases, "linear_scan_mosaic_gpu")
    return tuple(launch(*a, *b, *h0, *keep, *sel))


def backward(a, dh, h, h0, keep, *, chunk, reverse, interpret, stages=3, halves=1):
    """The fused backward of `forward` (lrulm.kernels.gpu.backward's contract): returns
    (g parts (rows, L, N), written over dh, and da parts: (rows, N) per-row partial sums
    for an (N,) a; (rows, L, N) in dh's dtype for a full one)."""
    rows, length, n = dh[0].shape
    num_parts, num_keep, dtype = len(dh), len(keep), dh[0].dtype
    full_a = a[0].ndim == 3
    chunk, stages = _shape(length, chunk, stages, 2 * num_parts, dtype.itemsize, num_keep, halves)
    padded_keep = _pad_keep(keep, length, chunk)
    width = CHANNELS // halves
    sel = (halves_lib.selector(width),) if halves > 1 else ()

    def kernel(*refs):
        if full_a:  # neither h nor h0: its da is formed after the kernel
            sizes = (num_parts,) * 2 + (num_keep, len(sel), num_parts)
            a_refs, dh_refs, keep_refs, sel_refs, g_refs, _ = group_refs(refs, sizes)
        else:
            sizes = (num_parts,) * 4 + (num_keep, len(sel), num_parts)
            groups = group_refs(refs, sizes)
            a_refs, dh_refs, h_refs, h0_refs, keep_refs, sel_refs, g_refs, da_refs = groups
        row, cols = _program(n // width, width)
        sel_views = [(x, x.dtype) for x in sel_refs]
        if full_a:  # a's first row: what the zeros below take their layout from
            first_rows = [(x.at[row, 0, cols], x.dtype) for x in a_refs]
            vectors = _load_vectors(first_rows + sel_views, halves)
            a_vec, h_init = None, ()
        else:
            vectors = _load_vectors(
                [(x.at[cols], x.dtype) for x in a_refs]
                + [(x.at[row, cols], x.dtype) for x in h0_refs]
                + sel_views,
                halves,
            )
            a_vec, h_init = vectors[:num_parts], vectors[num_parts : 2 * num_parts]
        selector = vectors[len(vectors) - len(sel) :]

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
                g = recurrence_step(g, conj(a_vec), dht)
            for ref, x in zip(rows, g):
                ref[t] = x.astype(ref.dtype)
            k_next = rows[-1][t].astype(jnp.float32) if num_keep else k_next
            return g, a_next, k_next, da

        def scoped(*smem):
            dh_smem, x_smem, keep_smem, da_smem, buffers = group_refs(
                smem, (num_parts,) * 2 + (num_keep, num_parts * (not full_a))
            )
            # Zeros in a loaded row's register layout (a loop carry keeps its layout; a
            # constant's is a splat), from a's real part: a decay, always finite.
            zeros = (0.0 * vectors[0],) * num_parts
            # No constant in the carry: one the walk never changes (keep without resets)
            # comes out of fori_loop as that constant, which jax >= 0.11's Mosaic GPU
            # lowering rejects as a result of run_scoped.
            if halves > 1:
                k_one = 0.0 * vectors[0] + 1.0
                scan = halves_lib.backward_scan(
                    num_parts=num_parts, num_keep=num_keep, full_a=full_a, a_vec=a_vec,
                    sel=selector[0], reverse=not reverse, buffers=buffers,
                )  # fmt: skip
            else:
                k_one = jnp.float32(1) if num_keep else ()
                scan = _rows(step, not reverse)
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
                scan=scan,
                carry=(zeros, zeros, k_one, zeros),
                halves=halves,
            )
            if full_a:
                return
            if num_keep:
                g = tuple(k_first * x for x in g)
            last = mul_conj(g, h_init)  # the forward's first row, after h0
            if halves > 1:  # added once, then the two halves' sums added together
                last = halves_lib.pick(selector[0] > 0.5, zeros, last)
            da = halves_lib.add(da, last)
            if halves > 1:
                da = halves_lib.add(da, halves_lib.swap(da, buffers))
            for s, x in zip(da_smem, da):
                s[...] = x
            plgpu.commit_smem()
            for ref, s in zip(da_refs, da_smem):
                view = s.at[0] if halves > 1 else s
                plgpu.copy_smem_to_gmem(view, ref.at[row, cols], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        da_shape = (halves, width) if halves > 1 else (width,)
        swaps = 3 * num_parts + 1 if halves > 1 else 0  # g, its product, keep (and a)
        pl.run_scoped(
            scoped,
            *_rings(stages, chunk, dtype, 2 * num_parts, padded_keep, halves),
            *[plgpu.SMEM(da_shape, jnp.float32) for _ in range(num_parts * (not full_a))],
            *halves_lib.swap_buffers(swaps, width),
        )

    out_type = [out_struct(dh[0].shape, dtype, dh[0])] * num_parts
    if not full_a:
        out_type += [out_struct((rows, n), jnp.float32, dh[0])] * num_parts
    aliases = write_over_b(num_parts)  # g over dh (dh is operands num_parts..)
    programs = rows * n // width
    launch = _launch(kernel, programs, out_type, interpret, aliases, "linear_scan_mosaic_gpu_bwd")
    if not full_a:
        out = launch(*a, *dh, *h, *h0, *padded_keep, *sel)
        return tuple(out[:num_parts]), tuple(out[num_parts:])
    g = tuple(launch(*a, *dh, *padded_keep, *sel))
    return g, full_da(g, h, h0, keep, reverse)
