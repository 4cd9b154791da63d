"""Which LM presets fit which TPU slices, and with what mesh: writes docs/tpu_fit.md.

    python tools/tpu_fit_table.py [--presets 125m,350m,1.3b] [--slices v5e-16,v4-64]
                                  [--per_chip_batch 8] [--seq_len 2048] [--out docs/tpu_fit.md]
                                  [--cache FILE.json]
    LRULM_JAX_CUDA_PLUGIN=DIR python tools/tpu_fit_table.py --slices h100:1,h100:8,h200:8 \
        --out docs/gpu_fit.md                # GPU hosts (lrulm compile's GPU targets)

For every preset and slice it compiles the real train step ahead of time
(`lrulm.compile`, no TPU needed) with each layout in turn (`LAYOUTS`: data parallel,
FSDP over the whole slice, each with full rematerialisation, then FSDP + remat with 4
micro-batches) and reports the first that XLA accepts. The global batch is
`per_chip_batch` sequences of `seq_len` tokens per chip. With --cache, finished cells are
kept in that file, so a run that is stopped resumes where it left off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import tool_args

from lrulm import compile as compile_lib
from lrulm import config as config_lib
from lrulm import model_config

PRESETS = ("125m", "350m", "1.3b")
SLICES = ("v5e-16", "v5e-256", "v4-64", "v5p-128", "v6e-64")

# (label, config overrides) in order of preference: no recomputation first (full remat
# runs each forward twice, +1/3 FLOPs), then least communication (FSDP gathers the
# parameters every step, data parallelism only reduces gradients).
_DP, _FSDP, _REMAT = (
    {"mesh.data": -1, "mesh.fsdp": 1},
    {"mesh.data": 1, "mesh.fsdp": -1},
    {"model.remat": "full"},
)
LAYOUTS = (
    ("data parallel", _DP),
    ("FSDP", _FSDP),
    ("data parallel + remat", {**_DP, **_REMAT}),
    ("FSDP + remat", {**_FSDP, **_REMAT}),
    ("FSDP + remat + 4 micro-batches", {**_FSDP, **_REMAT, "optim.grad_accum_steps": 4}),
)


def _config(preset: str, chips: int, per_chip_batch: int, seq_len: int, overrides: dict):
    c = config_lib.base_config()
    c.task = "lm"
    c.model.preset = preset
    c.train.seq_len = seq_len
    c.train.global_batch_size = per_chip_batch * chips
    for key, value in overrides.items():
        group, name = key.split(".")
        c[group][name] = value
    c.lock()
    return c


def _effective(preset: str, overrides: dict) -> tuple:
    """What a layout changes, with the preset's own remat folded in (1.3b has remat=full
    already, so the "+ remat" layouts would repeat the others)."""
    remat = overrides.get("model.remat", model_config.PRESETS[preset].get("remat", "none"))
    return (overrides["mesh.data"], overrides["mesh.fsdp"], remat,
            overrides.get("optim.grad_accum_steps", 1))  # fmt: skip


def fit(preset: str, topology: str, per_chip_batch: int, seq_len: int) -> dict:
    """The first layout that fits (or the last one tried) as a row of the table, with the
    layouts rejected before it and what XLA estimated they need."""
    chips = compile_lib.parse_target(topology).chips
    tried, row, rejected = set(), {}, []
    for label, overrides in LAYOUTS:
        if _effective(preset, overrides) in tried:
            continue
        tried.add(_effective(preset, overrides))
        config = _config(preset, chips, per_chip_batch, seq_len, overrides)
        t0 = time.perf_counter()
        try:
            r = compile_lib.compile_for_topology(
                config, topology, include_eval=False, measure_overflow=False
            )
        except ValueError as e:  # e.g. a batch the mesh cannot split
            if not row:  # else the last layout that compiled (and did not fit) stays the row
                row = dict(layout=label, fits=False, error=str(e))
            rejected.append((label, None))
            continue
        row = dict(
            layout=label, fits=r.fits, mesh=r.mesh, remat=r.remat, accum=r.grad_accum_steps,
            params=r.num_params, chips=r.chips, hbm=r.hbm_bytes, limit=r.limit_bytes,
            resident=r.train.total_bytes, state=r.state_bytes, temp=r.train.temp_bytes,
            measured=r.train.measured, mfu_bound=r.mfu_bound if r.fits else None,
            seconds=round(time.perf_counter() - t0, 1), rejected=list(rejected),
        )  # fmt: skip
        print(f"  {preset} on {topology}, {label}: {'fits' if r.fits else 'does not fit'} "
              f"({row['seconds']} s)", file=sys.stderr, flush=True)  # fmt: skip
        if r.fits:
            break
        rejected.append((label, r.train.total_bytes))
    return row


def _gib(x) -> str:
    return f"{x / compile_lib.GIB:.2f}"


def _version(distribution: str) -> str:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # not installed as a distribution (or from a --target folder)
        import jaxlib

        return jaxlib.__version__ if distribution.startswith("jax-cuda") else "?"


def markdown(rows: dict, per_chip_batch: int, seq_len: int, gpus: bool = False) -> str:
    """The table and how to read it."""
    import jax

    if gpus:
        what, chip = "GPU hosts", "GPU"
        compiler = f"jax's CUDA plugin {_version('jax-cuda12-plugin')} (deviceless)"
        how = "by XLA's GPU compiler (its Triton for the Pallas kernels)"
        checks = (
            "the figure held against the card's whole memory (a running jax preallocates "
            "75% of it unless XLA_PYTHON_CLIENT_PREALLOCATE=false)"
        )
    else:
        what, chip = "TPU slices", "TPU"
        compiler = f"libtpu {_version('libtpu')}"
        how = "by XLA's TPU compiler"
        checks = "the figure its TPU compiler checks"
    lines = [
        f"# Which LM presets fit which {what}",
        "",
        "Generated by `python tools/tpu_fit_table.py` on "
        f"{datetime.date.today().isoformat()} with jax {jax.__version__} and {compiler}, "
        "on a CPU machine: each cell is the real train step compiled ahead of time for the "
        f"{'host' if gpus else 'slice'} {how} (`lrulm compile`); nothing ran on a {chip}.",
        "",
        f"Batch: {per_chip_batch} sequences of {seq_len} tokens per chip "
        f"({per_chip_batch * seq_len} tokens per chip per step). Layouts are tried in order, "
        "no recomputation first, then least communication — data parallel; FSDP over the whole "
        "slice (`--config.mesh.data=1 --config.mesh.fsdp=-1`); data parallel with "
        "`--config.model.remat=full`; FSDP with remat; that with "
        "`--config.optim.grad_accum_steps=4` — and the first that "
        + ("fits" if gpus else "XLA accepts")
        + " is shown. "
        "The 1.3b preset has `remat=full` already. Only the train step is compiled (the "
        "eval step needs less). These rows are the bare presets (`lrulm.model_config.PRESETS`), "
        "not `configs/lm/base.py`, whose batches are larger and whose remat (`lru` for 125m, "
        "`dots` for 350m) lies between none and full: check that config on its own "
        f"{'host' if gpus else 'slice'} with `lrulm compile --config "
        "configs/lm/base.py:size=S --topology T`.",
        "",
        "Memory is per chip: resident = XLA's peak of the buffers live at once (arguments, "
        f"outputs, the temporaries live at that moment), {checks}; "
        "state = parameters and AdamW moments (float32) after sharding. For a layout that "
        "does not fit, the figure is XLA's early estimate of that peak (before its own "
        "rematerialisation), marked `~`. The MFU bound is a roofline ceiling (model FLOPs "
        "over peak x the larger of the compute and "
        "HBM-traffic times; collectives ignored; see `lrulm/compile.py`), not a forecast"
        + (" (none for GPUs: XLA's GPU compiler reports no FLOPs or bytes)." if gpus else "."),
        "",
        "| preset | params | slice | chips | HBM/chip GiB | fits | recommended layout "
        "| mesh (data x fsdp) | resident GiB | state GiB | MFU bound | rejected first (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        preset, topology = key.split("@")
        if "error" in r:
            lines.append(f"| {preset} | | {topology} | | | error | {r['error']} | | | | | |")
            continue
        est = "" if r["measured"] else "~"
        mfu = f"{100 * r['mfu_bound']:.0f}%" if r["mfu_bound"] is not None and not gpus else ""
        layout = r["layout"] if r["fits"] else f"none (last tried: {r['layout']})"
        rejected = "; ".join(
            f"{label} " + (f"~{_gib(need)}" if need else "(invalid)")
            for label, need in r.get("rejected", [])
        )
        lines.append(
            f"| {preset} | {r['params'] / 1e6:.0f}M | {topology} | {r['chips']} "
            f"| {r['hbm'] / compile_lib.GIB:g} | {'yes' if r['fits'] else '**no**'} | {layout} "
            f"| {r['mesh']['data']} x {r['mesh']['fsdp']} | {est}{_gib(r['resident'])} "
            f"| {_gib(r['state'])} | {mfu} | {rejected} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--slices", default=",".join(SLICES))
    p.add_argument("--per_chip_batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--out", default="docs/tpu_fit.md")
    p.add_argument("--cache", default="", help="keep finished cells here (resumable runs)")
    args = tool_args.show_defaults(p).parse_args(argv)
    try:  # its folder made now, as the table's would be
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: its folder cannot be made ({e.strerror})")
    tool_args.writable(p, args.out, "--out")
    targets = [compile_lib.parse_target(t) for t in args.slices.split(",")]
    gpus = [isinstance(t, compile_lib.GpuTopology) for t in targets]
    if any(gpus) and not all(gpus):
        raise SystemExit("--slices: TPU slices or GPU hosts, one kind to a table")
    cache_path = args.cache
    cache = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    settings = f"{args.per_chip_batch}x{args.seq_len}"
    if cache.get("settings") != settings:
        cache = {"settings": settings, "rows": {}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = {}
    for preset in args.presets.split(","):
        for topology in args.slices.split(","):
            key = f"{preset}@{topology}"
            if key not in cache["rows"]:
                cache["rows"][key] = fit(preset, topology, args.per_chip_batch, args.seq_len)
                if cache_path:
                    with open(cache_path, "w") as f:
                        json.dump(cache, f, indent=1)
            rows[key] = cache["rows"][key]
    with open(args.out, "w") as f:
        f.write(markdown(rows, args.per_chip_batch, args.seq_len, gpus=all(gpus)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
