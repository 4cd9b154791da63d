"""One LRU layer's forward+backward compiled for a TPU, per scan method: memory and bytes.

    python tools/lru_layer_aot.py --topology v5e:2x2 --shape 8,2048,768,768

No TPU needed: libtpu compiles for the topology (as `lrulm compile` does). For each
method the table gives the memory the program needs beyond its arguments and outputs
(XLA's peak less those: libtpu reports no temporaries for some of these programs) and
XLA's bytes accessed, both also in units of one (B, L, N) complex64 array, and the
number of relayout copies of an activation-sized array around the recurrence: static
figures of the compiled program, not timings (those come from tools/bench.py on the
device).
"""

from __future__ import annotations

import argparse
import json
import math
import re

import jax
import jax.numpy as jnp
import tool_args
from flax import nnx
from jax.sharding import SingleDeviceSharding

from lrulm import compile as compile_lib
from lrulm import lru as lru_lib
from lrulm import scan as scan_lib


def measure(device, method: str, b: int, l: int, h: int, n: int, resets: bool) -> dict:
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=SingleDeviceSharding(device)
    )
    graph, state = nnx.split(lru_lib.LRU(h, n, scan_method=method, rngs=nnx.Rngs(0)))

    def loss(state, u, r):
        return jnp.sum(nnx.merge(graph, state)(u, resets=r if resets else None) ** 2)

    state = jax.tree.map(lambda x: spec(x.shape, x.dtype), state)
    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = f.lower(state, spec((b, l, h), jnp.float32), spec((b, l), bool)).compile()
    text = compiled.as_text()
    copies = [
        dims
        for dims in re.findall(r"= \w+\[([0-9,]+)\]\S* copy(?:-start)?\(", text)
        if math.prod(map(int, dims.split(","))) == b * l * n
    ]
    unit = b * l * n * 8
    mem = compiled.memory_analysis()
    peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
    temp = max(mem.temp_size_in_bytes, peak - mem.argument_size_in_bytes - mem.output_size_in_bytes)
    moved = compiled.cost_analysis()["bytes accessed"]
    return dict(
        method=method,
        temp_mib=temp / 2**20,
        temp_units=temp / unit,
        bytes_gb=moved / 1e9,
        bytes_units=moved / unit,
        relayout_copies=len(copies),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--shape", default="8,2048,768,768", help="B,L,H,N")
    p.add_argument("--methods", default="pallas,associative,chunked")
    p.add_argument("--no_resets", action="store_true", help="without document resets")
    p.add_argument("--json", help="also write the rows here")
    args = tool_args.show_defaults(p).parse_args()
    tool_args.writable(p, args.json)
    try:
        b, l, h, n = map(int, args.shape.split(","))
    except ValueError:
        p.error(f"--shape takes B,L,H,N (four integers); got {args.shape!r}")
    if min(b, l, h, n) < 1:
        p.error(f"--shape: every size must be positive; got {args.shape}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = [m.value for m in scan_lib.ScanMethod if m.value != "auto"]
    if not methods or any(m not in known for m in methods):
        p.error(f"--methods {args.methods!r}: use some of {', '.join(known)}")
    try:
        device = compile_lib.topology_devices(compile_lib.parse_topology(args.topology))[0]
    except ValueError as e:
        p.error(f"--topology: {e}")
    print(f"LRU layer forward+backward, B={b} L={l} H={h} N={n}, on {device.device_kind}")
    print("unit = one (B, L, N) complex64 array")
    print(f"{'method':<12} {'work MiB':>9} {'units':>6} {'bytes GB':>9} {'units':>6} {'copies':>7}")
    rows = []
    for method in methods:
        r = measure(device, method, b, l, h, n, not args.no_resets)
        rows.append(r)
        print(
            f"{method:<12} {r['temp_mib']:9.1f} {r['temp_units']:6.2f} {r['bytes_gb']:9.3f} "
            f"{r['bytes_units']:6.2f} {r['relayout_copies']:7d}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
