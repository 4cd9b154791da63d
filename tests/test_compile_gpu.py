"""`lrulm compile` for GPUs this machine does not have (jax's CUDA plugin, deviceless)."""

import json
import os
import subprocess
import sys

import pytest

from lrulm import compile as compile_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.environ.get(compile_lib.PLUGIN_ENV, "")
# A Triton launch shape whose 16-step chunks XLA's GPU pipeline compiles in seconds (the
# default's 128 load registers: ~100 s a kernel pair here). What these tests check (the
# kernels partitioned per device, the collectives, the report) does not depend on it.
SHORT_TRITON = "32,1,16,prefetch"


def test_gpu_targets_parse_and_bad_ones_say_what_is_valid():
    h100 = compile_lib.parse_target("h100")
    assert (h100.name, h100.chips, h100.accelerator_type) == ("h100:1", 1, "1 x H100")
    h200 = compile_lib.parse_target("H200:8")
    assert (h200.generation.name, h200.chips, h200.hosts) == ("h200", 8, 1)
    pod = compile_lib.parse_target("h100:8x4")  # 4 hosts of 8
    assert (pod.chips, pod.hosts, pod.name) == (32, 4, "h100:8x4")
    assert pod.accelerator_type == "4 hosts x 8 x H100"
    assert h200.generation.hbm_gib > 139 > h100.generation.hbm_gib > 79
    # what XLA is told: the card's SMs, memory and name (its device_kind)
    config = h100.generation.target_config()
    fields = ("core_count: 132", "device_memory_size: 84929347584", "major: 9 minor: 0",
              'device_description_str: "NVIDIA H100 80GB HBM3"')  # fmt: skip
    assert all(field in config for field in fields), config
    assert compile_lib.parse_target("v5e:2x2").chips == 4  # TPUs as before
    for bad in ("h100:0", "h100:9", "h100:x", "h100:8x0", "h100:9x2", "h100:8x"):
        with pytest.raises(ValueError, match=r"h100:N or h100:NxHOSTS, N GPUs to a host \(1 to"):
            compile_lib.parse_target(bad)
    with pytest.raises(ValueError, match=r"or GPUs \(N to a host\): h100\[:N\[xHOSTS\]\]"):
        compile_lib.parse_target("a100")


def _compile(*args, plugin: str | None, tuning: str = ""):
    env = {k: v for k, v in os.environ.items() if k != compile_lib.PLUGIN_ENV}
    if plugin:
        env[compile_lib.PLUGIN_ENV] = plugin
    env.pop("JAX_PLATFORMS", None)  # the command picks the CPU itself
    env["LRULM_PALLAS_GPU_TUNING"] = tuning  # "": the default (Triton)
    return subprocess.run(
        [sys.executable, "-m", "lrulm", "compile", "--config", "configs/lm/tiny.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_compiling_for_a_gpu_without_the_plugin_says_what_to_install(tmp_path):
    result = _compile("--topology", "h100", plugin=str(tmp_path))  # an empty folder
    assert result.returncode == 2, result.stderr[-2000:]
    assert "needs jax's CUDA plugin" in result.stderr
    assert "pip install --target DIR jax-cuda12-plugin==" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    not PLUGIN, reason=f"needs jax's CUDA plugin in ${compile_lib.PLUGIN_ENV} (.ci/run installs it)"
)
def test_the_lm_train_step_with_the_pallas_scan_compiles_for_two_hosts_of_two_h100s(tmp_path):
    """XLA's whole GPU pipeline on the trainer's steps, sharded data (across the hosts) x
    tensor over 2 hosts of 2 H100s: the Triton kernels in the program, the gradients
    reduced across devices, and the report's card, memory and verdict. Then the Mosaic
    GPU kernels (never yet run on hardware) through the same sharded step: they lower
    and partition as Triton's do (the same collectives: no activation gathered), and
    compile, to sm_90a code, in the plugin (tools/gpu_sass.py reads that code)."""
    mesh = ("--config.mesh.data=2", "--config.mesh.tensor=2")
    # 128 state channels a device: what a Mosaic GPU program takes
    args = ("--topology", "h100:2x2", *mesh, "--config.model.scan_method=pallas",
            "--config.model.d_state=256")  # fmt: skip
    reports = {}
    for tuning in (SHORT_TRITON, "mosaic,32,6"):
        out = tmp_path / f"report{tuning}.json"
        result = _compile(*args, "--json", str(out), plugin=PLUGIN, tuning=tuning)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "custom calls in the train step (the kernels): " in result.stdout
        # no cost analysis on GPU: the bound says what its bytes are
        assert "(bytes: the arguments and outputs alone; XLA gave no" in result.stdout
        reports[tuning] = json.loads(out.read_text())
    report = reports[SHORT_TRITON]
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["chips"] == 4
    assert report["topology"] == "h100:2x2"
    assert report["mesh"] == dict(data=2, fsdp=1, sequence=1, tensor=2)
    assert report["hbm_bytes"] == 84_929_347_584 and report["fits"]
    assert report["train"]["custom_calls"]["__gpu$xla.gpu.triton"] >= 2  # forward, backward
    assert report["train"]["collectives"]["all-reduce"]["count"] > 0
    assert 0 < report["train"]["total_bytes"] < 2 * 1024**3
    assert report["eval"] is not None
    mosaic = reports["mosaic,32,6"]["train"]
    assert mosaic["custom_calls"].get("mosaic_gpu_v2", 0) >= 2, mosaic["custom_calls"]
    assert "__gpu$xla.gpu.triton" not in mosaic["custom_calls"]
    assert mosaic["collectives"] == report["train"]["collectives"]


_SHARDED_SCAN = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lrulm import compile as compile_lib, scan, target
from lrulm.kernels import mosaic_gpu  # before the plugin is on the path (as lrulm compile)
devices = compile_lib.gpu_devices(compile_lib.parse_target("h100:4"))
mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
spec = lambda shape, *axes: jax.ShapeDtypeStruct(shape, jnp.float32,
                                                 sharding=NamedSharding(mesh, P(*axes)))
a, b = (spec((256,), "tensor"),) * 2, (spec((4, 512, 256), "data", None, "tensor"),) * 2
loss = lambda a, b: sum(jnp.sum(h**2) for h in scan.linear_scan_planar(a, b, method="pallas"))
with target.compiling_for("gpu"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).compile().as_text()
ops = {k: v["count"] for k, v in compile_lib.collectives(text).items() if v["count"]}
print(json.dumps(dict(calls=compile_lib.custom_calls(text), collectives=ops)))
"""


@pytest.mark.skipif(
    not PLUGIN, reason=f"needs jax's CUDA plugin in ${compile_lib.PLUGIN_ENV} (.ci/run installs it)"
)
@pytest.mark.parametrize("tuning, kernel", [(SHORT_TRITON, "__gpu$xla.gpu.triton"),
                                            ("mosaic,32,6", "mosaic_gpu_v2")])  # fmt: skip
def test_a_scan_sharded_by_its_inputs_runs_its_gpu_kernel_per_device(tuning, kernel):
    """linear_scan on NamedSharding inputs (no trainer mesh): the partitioner runs the
    kernel per device (custom_partitioning), for Triton and for Mosaic GPU, and only the
    decay's gradient crosses devices: no activation is gathered. (The Mosaic GPU rows
    failed on an H100 in this path, at lowering, before; traced for the host instead of
    the GPU it gathered a and b onto every device.) XLA's compile compiles the Mosaic
    GPU kernels too, host launcher included, which needs Mosaic's runtime library found
    though jax's Mosaic GPU module was imported before the plugin was on the path."""
    env = dict(os.environ, LRULM_PALLAS_GPU_TUNING=tuning)
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCAN], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == dict(calls={kernel: 2}, collectives={"all-reduce": 1}), found


def test_traces_made_for_a_gpu_take_the_gpus_choices_on_this_host(monkeypatch):
    """Under target.compiling_for("gpu") the choices made while tracing are the GPU's: its
    "auto" method, and a single long sequence split in time (too few programs for the
    GPU's SMs otherwise), as in the program a GPU host would compile. Caches are dropped
    on the way in and out."""
    import jax
    import jax.numpy as jnp

    from lrulm import scan, scan_pallas, target

    forgotten = []
    monkeypatch.setattr(scan_pallas, "forget_traces", lambda: forgotten.append(1))
    a = (jnp.full((64,), 0.9),) * 2
    b = (jax.ShapeDtypeStruct((1, 4096, 64), jnp.float32),) * 2
    jaxpr = lambda: str(jax.make_jaxpr(lambda b: scan.linear_scan_planar(a, b, method="pallas"))(b))
    assert target.backend() == "cpu"
    here = jaxpr()
    with target.compiling_for("gpu"):
        assert target.backend() == "gpu" and len(forgotten) == 1
        assert scan.resolve("auto") is scan.resolve("auto", backend="gpu")
        on_gpu = jaxpr()
    assert target.backend() == "cpu" and len(forgotten) == 2
    # 2 programs of 32 channels for 132 SMs: 4 segments of 1024 steps
    assert "f32[1,4,1024,64]" in on_gpu and "f32[1,4,1024,64]" not in here
    monkeypatch.undo()
    scan_pallas.forget_traces()  # none of the GPU's traces for the tests after this one


def test_the_fit_table_says_gpu_hosts_and_gives_no_mfu_for_them(monkeypatch):
    """tools/tpu_fit_table.py for GPU hosts (docs/gpu_fit.md): its title and memory note
    are the GPU's, and no MFU ceiling is printed where XLA's GPU compiler counts no FLOPs."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import tpu_fit_table

    row = dict(layout="data parallel", fits=True, mesh=dict(data=8, fsdp=1), remat="none",
               accum=1, params=150e6, chips=8, hbm=84_929_347_584, limit=84_929_347_584,
               resident=9 * 2**30, state=2**30, temp=7 * 2**30, measured=True,
               mfu_bound=0.93, rejected=[])  # fmt: skip
    gpu = tpu_fit_table.markdown({"125m@h100:8": row}, 8, 2048, gpus=True)
    tpu = tpu_fit_table.markdown({"125m@v5e-16": {**row, "chips": 16}}, 8, 2048)
    assert gpu.startswith("# Which LM presets fit which GPU hosts")
    assert "nothing ran on a GPU" in gpu and "XLA_PYTHON_CLIENT_PREALLOCATE" in gpu
    assert "| 125m | 150M | h100:8 | 8 | 79.0966 | yes | data parallel | 8 x 1 | 9.00 |" in gpu
    assert "| 93% |" not in gpu and "| 93% |" in tpu
    assert tpu.startswith("# Which LM presets fit which TPU slices")
    with pytest.raises(SystemExit, match="one kind to a table"):
        tpu_fit_table.main(["--slices", "v5e-16,h100:8", "--out", os.devnull])


def test_the_fit_table_keeps_the_last_compiled_layout_when_a_later_one_cannot_be_built(
    monkeypatch,
):
    """A layout the batch cannot split (here the micro-batches) is a rejected layout,
    not the row: the row stays the last one that compiled and did not fit, with its
    memory (it said "error" and lost every estimate)."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import tpu_fit_table

    step = SimpleNamespace(total_bytes=20 * 2**30, temp_bytes=2**30, measured=False)

    def compile_for_topology(config, topology, **kwargs):
        if config.optim.grad_accum_steps > 1:
            raise ValueError("global batch 1 is not divisible by 1 x 4 accumulation steps")
        return SimpleNamespace(
            fits=False, mesh=dict(config.mesh), remat=config.model.remat,
            grad_accum_steps=1, num_params=1, chips=1, hbm_bytes=16 * 2**30,
            limit_bytes=16 * 2**30, train=step, state_bytes=2**30, mfu_bound=None,
        )  # fmt: skip

    monkeypatch.setattr(compile_lib, "compile_for_topology", compile_for_topology)
    row = tpu_fit_table.fit("tiny", "v5e-1", 1, 1 << 20)
    assert "error" not in row and row["layout"] == "FSDP + remat" and not row["fits"]
    assert row["resident"] == 20 * 2**30
