"""The GPU (Triton) kernels of the linear recurrence: grid over (row, channel block),
each program walking the whole sequence in chunks (design: lrulm.scan_pallas)."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from lrulm.kernels import mosaic_gpu
from lrulm.kernels.common import (
    Parts,
    conj,
    cost,
    group_refs,
    mul_conj,
    out_struct,
    split_refs,
    step,
    write_over_b,
)

# The launch shape, measured on an H200 (jax 0.11.2) at B=8 L=2048 N=1024 by
# tools/gpu_kernel_sweep.py: one warp of 32 channels per program (one channel per thread),
# 128 registers of loads per thread, split into two chunks so that the next chunk's loads
# are in flight while the current one is scanned. Prefetching took forward+backward from
# 0.609 to 0.334 ms (29% to 52% of the copy bandwidth) and the forward from 0.137 to 0.124
# ms; two warps of 64 channels measured the same as one of 32. Its SASS as XLA compiles
# it for an H100 (tools/gpu_sass.py) shows why the gain stopped there: the loop ends
# in 62 register moves (backward 58) of the chunk just loaded, each waiting for its load,
# so one chunk is in flight, not two. `pingpong` (two chunks an iteration, no moves, no
# spills up to 160 load registers forward and 192 backward) is the candidate that keeps
# two.
_GPU_CHANNELS = 32
_GPU_WARPS = 1
_GPU_LOAD_REGISTERS = 128  # of a thread's 255, so that nothing spills
_GPU_PREFETCH = True
_GPU_STAGES = 1
# A launch of fewer programs than SMs is split in time (below), into this many per SM.
_GPU_PROGRAMS_PER_SM = 2
_GPU_MIN_SEGMENT = 1024  # steps: a shorter segment would spend more on its exit sums
# Overrides all of the above: tools/gpu_kernel_sweep.py times alternatives on the device.
TUNING_ENV = "LRULM_PALLAS_GPU_TUNING"
_TUNING_FORMAT = (
    "CHANNELS,WARPS,LOAD_REGISTERS[,prefetch|,pingpong][,stages=S][,bwd=R][,segments=T], "
    "e.g. 32,1,128,prefetch (Triton), or mosaic,CHUNK,STAGES[,halves=2][,segments=T], "
    "e.g. mosaic,32,6 (Mosaic GPU)"
)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The GPU kernels' launch shape."""

    channels: int = _GPU_CHANNELS  # channels per program (a power of two)
    warps: int = _GPU_WARPS  # warps per program
    load_registers: int = _GPU_LOAD_REGISTERS  # values per thread in flight per chunk
    # Load chunk k+1 while chunk k is scanned (two chunks' registers, each half as long),
    # so that loads never wait for the arithmetic; off: load a chunk, then scan it.
    prefetch: bool = _GPU_PREFETCH
    # Triton's software pipelining of the chunk loop (num_stages): > 1 lets Triton stage
    # later chunks' loads through shared memory.
    stages: int = _GPU_STAGES
    # Time segments per sequence (`time_segments`): 0 picks them from the launch's
    # parallelism; T > 0 splits every scan whose length T divides into T.
    segments: int = 0
    # "triton" (this module), or "mosaic" (lrulm.kernels.mosaic_gpu: one warpgroup of 128
    # channels per program, `chunk` steps per TMA copy, `stages` copies in flight), which
    # takes the operands it supports and leaves the rest to Triton.
    kernel: str = "triton"
    chunk: int = 32  # Mosaic GPU only
    # Mosaic GPU only: 2 = two thread groups per program, each scanning half of every
    # chunk (64 channels a program: twice the programs, for launches with too few).
    halves: int = 1
    # Triton: the backward's load registers (0: load_registers). It streams dh and h
    # where the forward streams b, so with the same registers it has the same bytes in
    # flight for 3/2 the bytes to move; more registers may pay there.
    backward_load_registers: int = 0
    # Prefetch with the two chunks' registers taken in turn, two chunks a loop iteration
    # (`_walk_chunks`): both chunks are in flight at once, where the one-chunk loop's
    # register moves wait for each prefetched chunk to arrive (one in flight). Twice the
    # kernel's code. Implies prefetch.
    pingpong: bool = False

    def __post_init__(self):
        if self.channels < 1 or self.channels & (self.channels - 1):
            raise ValueError(f"{TUNING_ENV}: channels must be a power of two, got {self.channels}")
        if (
            self.kernel not in ("triton", "mosaic")
            or self.chunk < 1
            or self.halves not in (1, 2)
            or (self.pingpong and not self.prefetch)
        ):
            raise ValueError(f"{TUNING_ENV}: expected {_TUNING_FORMAT}; got {self}")
        if (
            min(self.warps, self.load_registers, self.stages) < 1
            or min(self.segments, self.backward_load_registers) < 0
        ):
            raise ValueError(
                f"{TUNING_ENV}: warps, load registers and stages must be >= 1, segments and "
                f"bwd >= 0; got {self}"
            )

    @classmethod
    def parse(cls, text: str) -> Tuning:
        fields = text.split(",")
        mosaic = fields[0] == "mosaic"
        try:
            numbers = [int(x) for x in fields[mosaic : mosaic + (2 if mosaic else 3)]]
            flags = _flags(fields[mosaic + len(numbers) :], mosaic=mosaic)
            if len(numbers) < 2 + (not mosaic):
                raise ValueError
        except ValueError:
            raise ValueError(f"{TUNING_ENV}={text!r}: expected {_TUNING_FORMAT}") from None
        if mosaic:
            chunk, stages = numbers
            return cls(
                # what time_segments counts programs by
                channels=mosaic_gpu.CHANNELS // flags["halves"],
                warps=4,  # one warpgroup
                stages=stages,
                segments=flags["segments"],
                kernel="mosaic",
                chunk=chunk,
                halves=flags["halves"],
            )
        flags["backward_load_registers"] = flags.pop("bwd")
        flags["prefetch"] |= flags["pingpong"]
        return cls(*numbers, **flags)

    def triton(self) -> Tuning:
        """The Triton launch shape: this one, or the default for a Mosaic GPU tuning (whose
        kernels leave to Triton the operands they do not take)."""
        return self if self.kernel == "triton" else Tuning(segments=self.segments)

    def __str__(self):
        if self.kernel == "mosaic":
            text = f"mosaic,{self.chunk},{self.stages}"
            text += f",halves={self.halves}" if self.halves > 1 else ""
            return text + (f",segments={self.segments}" if self.segments else "")
        text = f"{self.channels},{self.warps},{self.load_registers}"
        text += ",pingpong" if self.pingpong else ",prefetch" if self.prefetch else ""
        text += f",stages={self.stages}" if self.stages > 1 else ""
        text += f",bwd={self.backward_load_registers}" if self.backward_load_registers else ""
        return text + (f",segments={self.segments}" if self.segments else "")


def _flags(fields, *, mosaic: bool) -> dict:
    """The optional fields of a tuning: [prefetch|pingpong], stages=S and bwd=R (Triton),
    halves=H (Mosaic GPU), segments=T."""
    switches = () if mosaic else ("prefetch", "pingpong")
    flags = dict(segments=0, halves=1) if mosaic else dict(stages=1, bwd=0, segments=0)
    flags.update(dict.fromkeys(switches, False))
    for flag in fields:
        name, _, value = flag.partition("=")
        if flag in switches:
            flags[flag] = True
        elif name in flags and name not in switches and value:
            flags[name] = int(value)
        else:
            raise ValueError(flag)
    return flags


def tuning() -> Tuning:
    """The kernels' launch shape: the defaults, or $LRULM_PALLAS_GPU_TUNING when set (read
    while tracing: set it before the first call, as jitted programs keep what they saw)."""
    text = os.environ.get(TUNING_ENV, "")
    return Tuning.parse(text) if text else Tuning()


def time_segments(rows: int, length: int, n: int, *, backend: str, sms: int | None = None) -> int:
    """How many time segments the scan of (rows, length, n) is split into on this device
    (lrulm.sequence_parallel.split_scan_parts; 1: not split).

    A program walks its channels through the whole sequence, so a launch has
    rows x ceil(n / channels) programs: at one long sequence that is a few dozen for
    100+ SMs (125m at 1 x 65,536: 24), each waiting on its own loads. Splitting time T
    ways runs T times as many programs for one more read of b (and of dh backward).
    Picked only on a GPU, and only for launches of fewer programs than SMs (at B=8,
    N=1024 the kernel's 256 programs measured 57% of the copy bandwidth unsplit): the
    smallest power of two that gives every SM `_GPU_PROGRAMS_PER_SM` programs, with
    segments of at least `_GPU_MIN_SEGMENT` steps.

    Args:
      sms: the device's SM count; None: read from the first device (132 if unknown).
    """
    t = tuning()
    if t.segments:
        return t.segments if length % t.segments == 0 else 1
    if backend != "gpu":
        return 1
    programs = rows * pl.cdiv(n, min(t.channels, pl.next_power_of_2(n)))
    if sms is None:
        sms = getattr(jax.devices()[0], "core_count", 0) or 132  # an H100 / H200 has 132
    if programs >= sms:
        return 1
    segments = 1
    while (
        programs * segments < _GPU_PROGRAMS_PER_SM * sms
        and length % (2 * segments) == 0
        and length // (2 * segments) >= _GPU_MIN_SEGMENT
    ):
        segments *= 2
    return segments


def _launch(n, length, per_row, chunk, backward=False):
    """(channel block, number of blocks, chunk, prefetch, compiler params) for N channels,
    for the forward or the `backward` kernel; prefetch as `_walk_chunks` takes it."""
    t = tuning().triton()
    if backward and t.backward_load_registers:
        t = dataclasses.replace(t, load_registers=t.backward_load_registers)
    bn = min(t.channels, pl.next_power_of_2(n))  # Triton blocks are powers of two
    # Registers per load: one value per thread per channel the thread holds; prefetching
    # holds two chunks at once.
    per_thread = max(1, bn // (32 * t.warps)) * (1 + t.prefetch)
    chunk = max(1, min(chunk, length, t.load_registers // (per_row * per_thread)))
    params = plt.CompilerParams(num_warps=t.warps, num_stages=t.stages)
    return bn, pl.cdiv(n, bn), chunk, t.prefetch + t.pingpong, params


def _load_rows(rows, a_refs, b_refs, load, keep=None):
    """Every load of `rows` (one chunk) issued together: a list of (a, b, keep) per row,
    a () where a is time-invariant (held by the caller) or there are no resets.

    Args:
      rows: row (time) indices, static or traced, in the order the recurrence visits them.
      a_refs, b_refs: refs indexed by a row index first; a_refs empty for an (N,) a.
      load: load(ref, row) -> the row as float32.
      keep: keep(row) -> a float32 scalar, 1 to carry the state into the row, 0 to
        start it afresh there (a document boundary); None: always carry.
    """
    return [
        (
            tuple(load(r, t) for r in a_refs),
            tuple(load(r, t) for r in b_refs),
            () if keep is None else keep(t),
        )
        for t in rows
    ]


def _scan_rows(h, rows, loaded, a, h_refs, store):
    """Runs the recurrence over `rows` from their `_load_rows` values, storing each h.

    Args:
      h: the carried state, a tuple of float32 parts.
      a: the decay parts (float32) when `a` is time-invariant, else None (loaded per row).
      h_refs: the output refs; store(ref, row, value) writes one row.

    Returns:
      The state after the last row.
    """
    for t, (at, bt, kt) in zip(rows, loaded):
        if not isinstance(kt, tuple):  # a keep value, () without resets
            h = tuple(kt * x for x in h)
        h = step(h, a if a is not None else at, bt)
        for ref, x in zip(h_refs, h):
            store(ref, t, x)
    return h


# ----------------------------------------------------------------------------------


def _memory_ops(n, bn, num_blocks):
    """load(ref, t), store(ref, t, x), load_all(refs), store_all(refs, xs) for the current
    program's block of channels, masked where the last block hangs over the end of N."""
    mask = None
    if n % bn:
        j = pl.program_id(0) % num_blocks
        mask = j * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0) < n

    # (The interpreter's masked load/store wants a traced row index, not a Python int.)
    def load(ref, t):
        if mask is None:
            return ref[t].astype(jnp.float32)
        return plt.load(ref.at[jnp.int32(t)], mask=mask, other=0).astype(jnp.float32)

    def store(ref, t, x):
        x = x.astype(ref.dtype)
        if mask is None:
            ref[t] = x
        else:
            plt.store(ref.at[jnp.int32(t)], x, mask=mask)

    def load_all(refs):
        if mask is None:
            return tuple(r[...].astype(jnp.float32) for r in refs)
        return tuple(plt.load(r, mask=mask, other=0).astype(jnp.float32) for r in refs)

    def store_all(refs, xs):
        for r, x in zip(refs, xs):
            if mask is None:
                r[...] = x.astype(r.dtype)
            else:
                plt.store(r, x.astype(r.dtype), mask=mask)

    return load, store, load_all, store_all


def _walk_chunks(load, scan, carry, length, chunk, reverse, prefetch=0):
    """carry <- scan(carry, rows, load(rows)) over the sequence, `chunk` rows at a time in
    walk order: a fori_loop over whole chunks, then a shorter static tail (no padding in
    time). Nothing is loaded twice.

    Args:
      prefetch: 0: load a chunk, then scan it. 1: issue chunk k+1's loads, then scan
        chunk k, whose values the loop carries from the iteration before. 2 ("pingpong"):
        two chunks an iteration in two sets of registers taken in turn, each set reloaded
        right after it was scanned. With 1, both chunks are live at the loop's end, so
        it compiles to register moves of the values just loaded (seen in the sm_90 SASS
        of Triton's build, tools/gpu_sass.py), and a move waits for its load: each
        iteration waits for chunk k+1 before issuing chunk k+2's loads, one chunk in
        flight. With 2 there are no moves and both chunks are in flight while the
        older one is awaited; the price is twice the code.
    """
    num_chunks, tail = divmod(length, chunk)

    def chunk_rows(k, count=chunk):
        """Row indices of `count` steps from chunk k's first step in walk order."""
        start = k * chunk
        if reverse:
            return [length - 1 - start - i for i in range(count)]
        return [start + i for i in range(count)]

    if num_chunks and prefetch == 2:

        def body(j, state):
            c, x = state  # x: chunk 2j, loaded by the iteration before
            y = load(chunk_rows(2 * j + 1))
            c = scan(c, chunk_rows(2 * j), x)
            x = load(chunk_rows(2 * j + 2))  # into the registers chunk 2j has left
            return scan(c, chunk_rows(2 * j + 1), y), x

        pairs = (num_chunks - 1) // 2  # so that no iteration loads past the last chunk
        carry, x = jax.lax.fori_loop(0, pairs, body, (carry, load(chunk_rows(0))))
        k = 2 * pairs
        if num_chunks - k == 2:
            y = load(chunk_rows(k + 1))
            carry = scan(scan(carry, chunk_rows(k), x), chunk_rows(k + 1), y)
        else:
            carry = scan(carry, chunk_rows(k), x)
    elif num_chunks and prefetch:

        def body(k, state):
            c, current = state
            upcoming = load(chunk_rows(k + 1))  # in flight during the scan
            return scan(c, chunk_rows(k), current), upcoming

        carry, last = jax.lax.fori_loop(0, num_chunks - 1, body, (carry, load(chunk_rows(0))))
        carry = scan(carry, chunk_rows(num_chunks - 1), last)
    elif num_chunks:

        def body(k, c):
            rows = chunk_rows(k)
            return scan(c, rows, load(rows))

        carry = jax.lax.fori_loop(0, num_chunks, body, carry)
    if tail:
        rows = chunk_rows(num_chunks, tail)
        carry = scan(carry, rows, load(rows))
    return carry


def forward(
    a: Parts, b: Parts, h0: Parts, keep: Parts, *, chunk, reverse, interpret, over_b=False
) -> Parts:
    rows, length, n = b[0].shape
    num_parts, full_a = len(b), a[0].ndim == 3
    per_row = num_parts * (1 + full_a) + len(keep)  # values loaded per channel per step
    bn, num_blocks, chunk, prefetch, params = _launch(n, length, per_row, chunk)

    def kernel(*refs):
        a_refs, b_refs, h0_refs, keep_refs, h_refs, _ = split_refs(refs, num_parts, len(keep))
        load, store, load_all, _ = _memory_ops(n, bn, num_blocks)
        h = load_all(h0_refs)
        a_const = None if full_a else load_all(a_refs)
        load_chunk = functools.partial(
            _load_rows,
            a_refs=a_refs if full_a else (),
            b_refs=b_refs,
            load=load,
            # One scalar per step, the same for every channel of the row.
            keep=(lambda t: keep_refs[0][t].astype(jnp.float32)) if keep else None,
        )
        scan = functools.partial(_scan_rows, a=a_const, h_refs=h_refs, store=store)
        _walk_chunks(load_chunk, scan, h, length, chunk, reverse, prefetch)

    seq_spec = pl.BlockSpec((None, length, bn), lambda p: (p // num_blocks, 0, p % num_blocks))
    state_spec = pl.BlockSpec((None, bn), lambda p: (p // num_blocks, p % num_blocks))
    a_spec = seq_spec if full_a else pl.BlockSpec((bn,), lambda p: (p % num_blocks,))
    in_specs = [a_spec] * num_parts + [seq_spec] * num_parts + [state_spec] * num_parts
    in_specs += [pl.BlockSpec((None, length), lambda p: (p // num_blocks, 0))] * len(keep)
    dtype = b[0].dtype
    return tuple(
        pl.pallas_call(
            kernel,
            out_shape=[out_struct(b[0].shape, dtype, b[0])] * num_parts,
            grid=(rows * num_blocks,),
            in_specs=in_specs,
            out_specs=[seq_spec] * num_parts,
            compiler_params=params,
            cost_estimate=cost(num_parts, full_a, rows, length, n, dtype.itemsize),
            input_output_aliases=write_over_b(num_parts) if over_b else {},
            interpret=interpret,
            name="linear_scan_gpu",
        )(*a, *b, *h0, *keep)
    )


def backward(a, dh, h, h0, keep, *, chunk, reverse, interpret):
    """The gradient of the forward kernel, in one pass (the fused backward).

    Walks the sequence opposite to the forward, carrying g_t = conj(a_{t+1}) keep_{t+1}
    g_{t+1} + dh_t (the cotangent of b, written out) and, in the same step, forms
    da_t = keep_t g_t conj(h_{t-1}) from the h row the forward wrote (h0 at the first
    position): summed in registers for a time-invariant a (one (N,) row per program),
    written per step for a full a. The shifted a_{t+1} and keep_{t+1} are the values the
    walk loaded one step earlier, so no shifted copies exist. Bytes: read dh and h, write
    g (plus a and da when a is full), against read dh, write g, then read g and h again
    for da when the backward is the forward kernel run backwards.

    Returns:
      (g parts (rows, L, N), da parts: (rows, N) float32 partial sums, or (rows, L, N)
      in dh's dtype for a full a (one product a step, as every kernel writes it).
    """
    rows, length, n = dh[0].shape
    num_parts, full_a = len(dh), a[0].ndim == 3
    per_row = num_parts * (2 + full_a) + len(keep)  # dh, h_{t-1} (and a) per step
    bn, num_blocks, chunk, prefetch, params = _launch(n, length, per_row, chunk, backward=True)
    first = length - 1 if reverse else 0  # the forward's first row: h0 precedes it
    before = (lambda t: t + 1) if reverse else (lambda t: t - 1)

    def kernel(*refs):
        sizes = [num_parts] * 4 + [len(keep), num_parts, num_parts]
        a_refs, dh_refs, h_refs, h0_refs, keep_refs, g_refs, da_refs, _ = group_refs(refs, sizes)
        load, store, load_all, store_all = _memory_ops(n, bn, num_blocks)
        h0 = load_all(h0_refs)
        a_const = None if full_a else load_all(a_refs)

        def previous_state(t, may_be_first):
            """h_{t-1} in the forward's order; h0 before its first row."""
            if isinstance(t, int):
                return h0 if t == first else tuple(load(r, before(t)) for r in h_refs)
            if not may_be_first:
                return tuple(load(r, before(t)) for r in h_refs)
            row = jnp.clip(before(t), 0, length - 1)
            return tuple(jnp.where(t == first, x0, load(r, row)) for x0, r in zip(h0, h_refs))

        def inputs(t, may_be_first):
            at = a_const if a_const is not None else tuple(load(r, t) for r in a_refs)
            kt = keep_refs[0][t].astype(jnp.float32) if keep else ()
            return at, tuple(load(r, t) for r in dh_refs), previous_state(t, may_be_first), kt

        def load_chunk(rows):
            """The whole chunk's loads in flight together. The forward's first row is the
            walk's last, so only a chunk's last row can be it: the others load h_{t-1}
            with no clamp or select (which cost registers and instructions a row)."""
            return [inputs(t, i == len(rows) - 1) for i, t in enumerate(rows)]

        def scan(carry, rows, loaded):
            g, a_next, k_next, da = carry
            for t, (at, dht, hp, kt) in zip(rows, loaded):
                if keep:
                    g = tuple(k_next * x for x in g)
                g = step(g, conj(a_next), dht)
                for ref, x in zip(g_refs, g):
                    store(ref, t, x)
                contribution = mul_conj(g, hp)
                if keep:
                    contribution = tuple(kt * x for x in contribution)
                if full_a:
                    for ref, x in zip(da_refs, contribution):
                        store(ref, t, x)
                else:
                    da = tuple(x + y for x, y in zip(da, contribution))
                a_next, k_next = at, (kt if keep else k_next)
            return g, a_next, k_next, da

        zeros = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(num_parts))
        # g starts at zero, so the "next" a and keep of the first walk step do not matter.
        carry = (zeros, a_const or zeros, jnp.float32(1), zeros)
        _, _, _, da = _walk_chunks(load_chunk, scan, carry, length, chunk, not reverse, prefetch)
        if not full_a:
            store_all(da_refs, da)

    seq_spec = pl.BlockSpec((None, length, bn), lambda p: (p // num_blocks, 0, p % num_blocks))
    state_spec = pl.BlockSpec((None, bn), lambda p: (p // num_blocks, p % num_blocks))
    a_spec = seq_spec if full_a else pl.BlockSpec((bn,), lambda p: (p % num_blocks,))
    in_specs = [a_spec] * num_parts + [seq_spec] * (2 * num_parts) + [state_spec] * num_parts
    in_specs += [pl.BlockSpec((None, length), lambda p: (p // num_blocks, 0))] * len(keep)
    dtype = dh[0].dtype
    da_shape = (rows, length, n) if full_a else (rows, n)
    out = pl.pallas_call(
        kernel,
        out_shape=[out_struct(dh[0].shape, dtype, dh[0])] * num_parts
        + [out_struct(da_shape, dtype if full_a else jnp.float32, dh[0])] * num_parts,
        grid=(rows * num_blocks,),
        in_specs=in_specs,
        out_specs=[seq_spec] * num_parts + [seq_spec if full_a else state_spec] * num_parts,
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=4 * num_parts**2 * rows * length * n,
            transcendentals=0,
            bytes_accessed=(3 + 2 * full_a) * num_parts * rows * length * n * dtype.itemsize,
        ),
        input_output_aliases=write_over_b(num_parts),  # g written over dh
        interpret=interpret,
        name="linear_scan_gpu_bwd",
    )(*a, *dh, *h, *h0, *keep)
    return tuple(out[:num_parts]), tuple(out[num_parts:])
