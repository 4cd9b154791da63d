"""The whole performance table in one command: scan methods, an LRU layer, train steps.

    python tools/bench.py                        # sized for the backend (GPU: docs/design.md §4)
    python tools/bench.py --quick --json b.json  # CI: tiny sizes, < 1 minute on 2 CPU cores
    python tools/bench.py --sections train --presets 350m --scan_methods associative,pallas \\
        --long 125m:65536 --json b.json          # one preset per scan method + a 64k row
    python tools/bench.py --render b.json        # the table again from a saved (or partial) run

Sections (--sections, default all three):
  scan   every linear_scan method the backend runs natively (pallas on GPU / TPU only,
         unless --methods names it), complex64 and, where lrulm.scan has it, the planar
         (float32 re / im) form: forward and forward+backward ms, GB/s and % of the copy
         bandwidth measured here (tools/bench_scan.py has the byte floors).
  lru    one lrulm.lru.LRU layer per scan method: forward and forward+backward (gradients
         w.r.t. parameters and input) ms, tokens/s, the compiled program's temporaries.
  train  the real train step of each --presets preset (tools/bench_train.py), once per
         --scan_methods method: step ms, tokens/s, MFU, per-device memory. --long
         PRESET:SEQ_LEN[:METHOD] adds a batch-1 row with remat "full" and the
         vocabulary-blocked loss: does that context fit on one device, and how fast.

A row that fails (out of memory, any exception) says "failed: reason" and the run goes
on; a row that would start after its section's --budget_s is "skipped". The JSON is
rewritten after every row, so a run killed by an outer time limit leaves what it had.
Progress lines go to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import os

# Without this XLA takes 75% of GPU memory up front and the allocator's peak means nothing.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

# tools/ is on sys.path when this file runs as a script (python tools/bench.py).
import bench_scan  # noqa: E402
import bench_train  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import tool_args
from flax import nnx  # noqa: E402

from lrulm.kernels import gpu as gpu_kernels  # noqa: E402
from lrulm.lru import LRU  # noqa: E402
from lrulm.model_config import PRESETS  # noqa: E402
from lrulm.scan import ScanMethod  # noqa: E402

SECTIONS = ("scan", "lru", "train")

# Sizes per profile. "accelerator" is docs/design.md §4's scan size and the presets at the
# batch of one H100, budgeted to finish in ~5 minutes with compiles; "cpu" takes a few
# minutes on 2 cores; "quick" is for CI.
PROFILES = {
    "accelerator": dict(
        scan_shape="8,2048,1024",
        lru_shape="1024,1024,8,2048",
        lru_dtype="bfloat16",
        presets="125m,350m,1.3b",
        batch=8,
        seq_len=2048,
        steps=5,
        repeats=5,
        budget_s="scan=60,lru=60,train=150",
    ),
    "cpu": dict(
        scan_shape="4,1024,128",
        lru_shape="128,128,4,1024",
        lru_dtype="float32",
        presets="test,tiny",
        batch=8,
        seq_len=256,
        steps=3,
        repeats=3,
        budget_s="scan=120,lru=120,train=240",
    ),
    "quick": dict(
        scan_shape="2,256,32",
        lru_shape="32,32,2,128",
        lru_dtype="float32",
        presets="test",
        batch=2,
        seq_len=64,
        steps=2,
        repeats=2,
        budget_s="scan=30,lru=30,train=60",
    ),
}


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    """The exception's type and first line, short enough for a table cell."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= 120 else text[:117] + "..."


class Section:
    """Runs a section's rows under its wall-clock budget, catching each row's failure."""

    def __init__(self, name: str, budget_s: float, rows: list, save):
        self.name, self.budget_s, self.rows, self.save = name, budget_s, rows, save
        self.start = time.perf_counter()

    def run(self, label: dict, describe, fn, *args, **kwargs) -> dict:
        """Appends label + fn(*args, **kwargs)'s figures (or its failure) to the rows and
        saves; describe(row) is the progress line of a row that ran. Returns the row."""
        elapsed = time.perf_counter() - self.start
        name = " ".join(f"{k}={v}" for k, v in label.items() if v != "")
        row = dict(label)
        if elapsed >= self.budget_s:
            row["status"] = f"skipped: {self.name} budget of {self.budget_s:.0f} s spent"
        else:
            _progress(f"[{self.name} {elapsed:5.1f} s] {name} ...")
            start = time.perf_counter()
            try:
                row.update(fn(*args, **kwargs))
                row["status"] = "ok"
            except Exception as e:  # any failure (out of memory included) is a result here
                row["status"] = "failed: " + _reason(e)
                del e
                gc.collect()  # the failed row's arrays, before the next row allocates
            row["wall_s"] = time.perf_counter() - start
        _progress(
            f"[{self.name}] {name}: {describe(row) if row['status'] == 'ok' else row['status']}"
        )
        self.rows.append(row)
        self.save()
        return row


# ------------------------------------------------------------------------------------
# The LRU layer.
# ------------------------------------------------------------------------------------


def time_lru(H: int, N: int, B: int, L: int, dtype: str, method: str, *, chunk_size, repeats):
    """Forward and forward+backward of one LRU layer on (B, L, H) inputs."""
    model = LRU(d_model=H, d_state=N, scan_method=method, chunk_size=chunk_size, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    u = jax.random.normal(jax.random.key(1), (B, L, H), jnp.dtype(dtype))

    def fwd(params, u):
        return nnx.merge(graphdef, params)(u)

    def loss(params, u):
        return jnp.sum(fwd(params, u).astype(jnp.float32))

    row = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", jax.grad(loss, argnums=(0, 1)))):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(params, u).compile()
        row[f"{name}_compile_s"] = time.perf_counter() - start
        t = bench_scan._time(compiled, params, u, repeats=repeats)
        row[f"{name}_ms"] = 1e3 * t
        row[f"{name}_tokens_per_s"] = B * L / t
        row[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    return row


def train_row(preset, batch, seq_len, steps, *, one_device=False, **config_kw) -> dict:
    """tools/bench_train.py's figures for one preset (the real jitted train step)."""
    config = bench_train.make_config(preset, batch, seq_len, **config_kw)
    return bench_train.run(config, steps, jax.devices()[:1] if one_device else None)


# ------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------


def _bytes(n) -> str:
    if n is None:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _table(header: str, rows: list[dict], cells, keep: int) -> list[str]:
    """Markdown rows under "a|b|c" headers; a row that did not run keeps its first `keep`
    cells (what it is), then says why."""
    headers = header.split("|")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        values = cells(r)
        if r["status"] != "ok":
            values = values[:keep] + [r["status"]] + [""] * (len(headers) - keep - 1)
        lines.append("| " + " | ".join(values) + " |")
    return lines


def render(result: dict) -> str:
    """The markdown report of a run's JSON (complete or cut short)."""
    lines = [
        f"# lrulm benchmark: {result['device']} ({result['backend']}, "
        f"{result['devices']} device(s)), jax {result['jax_version']}"
        + (f", pallas GPU tuning {result['gpu_tuning']}" if result.get("gpu_tuning") else ""),
        "",
        f"copy bandwidth {result['copy_GBps']:.1f} GB/s (x + 1 over "
        f"{_bytes(result['copy_bytes'])}, bytes read + written)",
    ]
    scan = result.get("scan")
    if scan:
        lines += [
            "",
            f"## Linear scan: B={scan['B']} L={scan['L']} N={scan['N']} complex64, "
            f"chunk {scan['chunk_size']}; byte floors fwd {scan['floor_fwd_ms']:.3f} ms, "
            f"fwd+bwd {scan['floor_fwd_bwd_ms']:.3f} ms",
            "",
        ]
        lines += _table(
            "method|form|grad|fwd ms|fwd GB/s|fwd % copy|fwd+bwd ms|fwd+bwd GB/s|fwd+bwd % copy",
            scan["rows"],
            lambda r: [
                r["method"],
                r["form"],
                r["grad"],
                _num(r.get("fwd_ms"), ".3f"),
                _num(r.get("fwd_GBps"), ".1f"),
                _num(r.get("fwd_pct_copy"), ".1f"),
                _num(r.get("fwd_bwd_ms"), ".3f"),
                _num(r.get("fwd_bwd_GBps"), ".1f"),
                _num(r.get("fwd_bwd_pct_copy"), ".1f"),
            ],
            keep=3,
        )
    lru = result.get("lru")
    if lru:
        lines += [
            "",
            f"## LRU layer: H={lru['H']} N={lru['N']}, input {lru['B']} x {lru['L']} "
            f"{lru['dtype']}; temporaries from the compiled program",
            "",
        ]
        lines += _table(
            "method|fwd ms|fwd tokens/s|fwd temp|fwd+bwd ms|fwd+bwd tokens/s|fwd+bwd temp",
            lru["rows"],
            lambda r: [
                r["method"],
                _num(r.get("fwd_ms"), ".3f"),
                _num(r.get("fwd_tokens_per_s"), ",.0f"),
                _bytes(r.get("fwd_temp_bytes")),
                _num(r.get("fwd_bwd_ms"), ".3f"),
                _num(r.get("fwd_bwd_tokens_per_s"), ",.0f"),
                _bytes(r.get("fwd_bwd_temp_bytes")),
            ],
            keep=1,
        )
    train = result.get("train")
    if train:
        lines += [
            "",
            "## Train step: per device; arguments and temporaries from the compiled step, "
            "peak = the allocator's peak where this row raised it (– where an earlier row in "
            "the process had reached more)",
            "",
        ]

        def cells(r):
            mfu = r.get("mfu")
            speedup = r.get("speedup")
            return [
                r["name"],
                f"{r['batch']} x {r['seq_len']}",
                r.get("scan_method") or "preset's",
                _num(r.get("params") and r["params"] / 1e6, ".3g"),
                r.get("remat", "–"),
                _num(r.get("step_time_ms"), ".1f"),
                _num(r.get("tokens_per_s"), ",.0f"),
                "–" if mfu is None else f"{100 * mfu:.1f}%",
                "–" if speedup is None else f"{speedup:.2f}x",
                _bytes(r.get("argument_bytes_per_device")),
                _bytes(r.get("temp_bytes_per_device")),
                _bytes(r.get("peak_bytes_in_use")),
                _num(r.get("compile_s"), ".1f"),
            ]

        lines += _table(
            "row|batch x seq|scan|params M|remat|step ms|tokens/s|MFU|speedup vs first scan|"
            "arguments|temporaries|peak|compile s",
            train["rows"],
            cells,
            keep=3,
        )
    walls = result.get("section_wall_s", {})
    if walls:
        lines += ["", "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------


def _ints(text: str, n: int, what: str) -> list[int]:
    values = [int(v) for v in text.replace("x", ",").split(",")]
    if len(values) != n:
        raise SystemExit(f"--{what} needs {n} comma-separated integers; got {text!r}")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # 0: no row after the first of each section
        raise SystemExit(f"--budget_s: {text!r} is not a number of seconds (>= 0)")
    return value


def _budgets(text: str) -> dict[str, float]:
    """ "120" (every section) or "scan=60,train=200" (the rest unlimited)."""
    if "=" not in text:
        return dict.fromkeys(SECTIONS, _seconds(text))
    budgets = dict.fromkeys(SECTIONS, math.inf)
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        if key not in SECTIONS:
            raise SystemExit(f"--budget_s: unknown section {key!r}; use {', '.join(SECTIONS)}")
        budgets[key] = _seconds(value)
    return budgets


def _long_rows(specs: list[str]) -> list[tuple[str, int, str]]:
    rows = []
    for spec in specs:
        for item in filter(None, spec.split(",")):
            parts = item.split(":")
            if len(parts) not in (2, 3) or not parts[1].isdigit():
                raise SystemExit(
                    f"--long takes PRESET:SEQ_LEN[:METHOD], e.g. 125m:65536; got {item}"
                )
            rows.append((parts[0], int(parts[1]), parts[2] if len(parts) == 3 else ""))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--methods", default="", help="scan / LRU sections; default: the backend's")
    p.add_argument("--chunk_size", type=int, default=64)
    p.add_argument("--scan_shape", help="B,L,N of the scan section")
    p.add_argument("--lru_shape", help="H,N,B,L of the LRU layer section")
    p.add_argument("--lru_dtype", help="float32 or bfloat16 inputs to the LRU layer")
    p.add_argument("--presets", help="comma-separated train presets; '' for none")
    p.add_argument("--batch", type=int, help="train: global batch (sequences)")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--steps", type=int, help="train: timed steps after a warm-up step")
    p.add_argument("--scan_methods", default="", help="train: one row per method per preset")
    p.add_argument("--long", action="append", default=[], help="PRESET:SEQ_LEN[:METHOD]")
    p.add_argument("--repeats", type=int, help="scan / LRU: best of this many calls")
    p.add_argument("--budget_s", help='per section: "120" or "scan=60,lru=60,train=150"')
    p.add_argument("--json", default="", help="write every row here (after each row)")
    p.add_argument("--render", default="", help="print the table of a saved JSON and exit")
    args = tool_args.show_defaults(p).parse_args(argv)
    tool_args.writable(p, args.json)
    if args.render:
        return args
    if args.quick:
        profile = "quick"
    else:
        profile = "cpu" if jax.default_backend() == "cpu" else "accelerator"
    for key, value in PROFILES[profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.profile = profile
    for name in ("batch", "seq_len", "steps", "repeats", "chunk_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be positive; got {getattr(args, name)}")
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; use {', '.join(SECTIONS)}")
    args.budgets = _budgets(args.budget_s)
    args.long_rows = _long_rows(args.long)
    _check_names(args)
    return args


def _check_names(args) -> None:
    """Unknown scan methods or presets stop the run before anything is compiled, not as
    failed rows after minutes of the others."""
    methods = [m.value for m in ScanMethod]
    named = [("--methods", m) for m in args.methods.split(",") if m]
    named += [("--scan_methods", m) for m in args.scan_methods.split(",") if m]
    named += [("--long", m) for _, _, m in args.long_rows if m]
    for flag, m in named:
        if m not in methods:
            raise SystemExit(f"{flag}: unknown scan method {m!r}; use {', '.join(methods)}")
    presets = [("--presets", p) for p in args.presets.split(",") if p]
    presets += [("--long", p) for p, _, _ in args.long_rows]
    for flag, preset in presets:
        if preset not in PRESETS:
            raise SystemExit(f"{flag}: unknown preset {preset!r}; use {', '.join(PRESETS)}")


def scan_section(args, result, save, methods) -> None:
    B, L, N = _ints(args.scan_shape, 3, "scan_shape")
    a, b = bench_scan.make_inputs(B, L, N)
    bandwidth = result["copy_GBps"] * 1e9
    scan = result["scan"] = {**bench_scan.header(B, L, N, bandwidth), "rows": []}
    scan["chunk_size"] = args.chunk_size
    section = Section("scan", args.budgets["scan"], scan["rows"], save)
    show = lambda r: f"fwd {_num(r['fwd_ms'], '.3f')} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms"
    kw = dict(chunk_size=args.chunk_size, repeats=args.repeats, bandwidth=bandwidth)
    # The planar form first: it is what the LRU layer and the kernels run (a complex
    # array is split into planes and joined again around them), so a short budget
    # measures it before the complex rows.
    if bench_scan.planar_available():
        for resets in (False, True):  # the LM resets the state at each document
            for m in methods:
                label = dict(method=m, form="planar+resets" if resets else "planar", grad="default")
                section.run(label, show, bench_scan.time_planar, a, b, m, resets=resets, **kw)
    for m in methods:
        for grad in bench_scan.grads_for(m):
            label = dict(method=m, form="complex", grad=grad)
            section.run(label, show, bench_scan.time_method, a, b, m, grad, **kw)
    result["section_wall_s"]["scan"] = time.perf_counter() - section.start


def lru_section(args, result, save, methods) -> None:
    H, N, B, L = _ints(args.lru_shape, 4, "lru_shape")
    lru = result["lru"] = dict(H=H, N=N, B=B, L=L, dtype=args.lru_dtype, rows=[])
    lru["chunk_size"] = args.chunk_size
    section = Section("lru", args.budgets["lru"], lru["rows"], save)
    show = lambda r: f"fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms"
    kw = dict(chunk_size=args.chunk_size, repeats=args.repeats)
    for m in methods:
        section.run(dict(method=m), show, time_lru, H, N, B, L, args.lru_dtype, m, **kw)
    result["section_wall_s"]["lru"] = time.perf_counter() - section.start


def train_section(args, result, save) -> None:
    train = result["train"] = {"steps": args.steps, "rows": []}
    section = Section("train", args.budgets["train"], train["rows"], save)
    show = lambda r: f"{r['step_time_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s"
    scan_methods = [m for m in args.scan_methods.split(",") if m] or [""]  # "" = preset's
    for preset in filter(None, args.presets.split(",")):
        first = None
        for m in scan_methods:
            label = dict(name=preset, batch=args.batch, seq_len=args.seq_len, scan_method=m)
            shape = (preset, args.batch, args.seq_len, args.steps)
            row = section.run(label, show, train_row, *shape, scan_method=m)
            if row["status"] == "ok" and len(scan_methods) > 1:
                first = first or row
                row["speedup"] = first["step_time_ms"] / row["step_time_ms"]
                save()  # section.run saved the row before its speedup was known
    for preset, seq_len, m in args.long_rows:
        label = dict(name=f"{preset} long", batch=1, seq_len=seq_len, scan_method=m)
        # On one device: the question is whether this context fits on one chip. The
        # blocked loss never forms the (1, seq_len, vocab) logits (configs/lm/base.py).
        kw = dict(scan_method=m, remat="full", loss_vocab_block=4096, one_device=True)
        section.run(label, show, train_row, preset, 1, seq_len, args.steps, **kw)
    result["section_wall_s"]["train"] = time.perf_counter() - section.start


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return
    result = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax_version": jax.__version__,
        # The GPU kernels' launch shape (and Triton or Mosaic GPU) the pallas rows ran.
        "gpu_tuning": str(gpu_kernels.tuning()) if jax.default_backend() == "gpu" else "",
        "profile": args.profile,
        "argv": sys.argv[1:],
        "section_wall_s": {},
    }

    def save():  # after every row: a run killed by an outer time limit keeps its rows
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    # The copy bandwidth over an array the size of the scan's b (read + written).
    nbytes = math.prod(_ints(args.scan_shape, 3, "scan_shape")) * 8
    bandwidth = bench_scan.copy_bandwidth(nbytes, args.repeats)
    result.update(copy_GBps=bandwidth / 1e9, copy_bytes=nbytes)
    _progress(f"{result['device']}: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    methods = [m for m in args.methods.split(",") if m] or bench_scan.default_methods()
    if "scan" in args.sections:
        scan_section(args, result, save, methods)
    if "lru" in args.sections:
        lru_section(args, result, save, methods)
    if "train" in args.sections:
        train_section(args, result, save)
    save()
    print(render(result), flush=True)


if __name__ == "__main__":
    main()
