"""Ahead-of-time compilation for TPU topologies (`lrulm compile`), on a CPU machine."""

import json
import re

import pytest

from lrulm import compile as compile_lib
from lrulm import config as config_lib
from lrulm import tasks


def _topology_api_available() -> str:
    """Why libtpu cannot describe a TPU slice here; empty when it can."""
    try:
        compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"))
    except Exception as e:  # no libtpu wheel, or a libtpu without the topology API
        return f"{type(e).__name__}: {e}"
    return ""


_why_not = _topology_api_available()
if _why_not:
    pytest.skip(
        f"TPU topology API unavailable (install jax[tpu] for libtpu): {_why_not}",
        allow_module_level=True,
    )

SEQ, BATCH = 64, 16  # one chunk of the chunked scan: the smallest program to compile


def _config(preset="tiny", **mesh):
    overrides = [("model.preset", preset), ("train.seq_len", str(SEQ)),
                 ("train.global_batch_size", str(BATCH))]  # fmt: skip
    overrides += [(f"mesh.{k}", str(v)) for k, v in mesh.items()]
    return config_lib.load_with_overrides("configs/lm/tiny.py", overrides)


def _expected_argument_bytes(config, data: int, fsdp: int) -> int:
    """Per-chip train-step arguments from the model's shapes and the axis rules alone.

    Every parameter with an "embed" axis is split over fsdp (the rule "embed" -> fsdp);
    the LRU's nu/theta/gamma (state,) and the GLU / MLP-in biases (mlp,) carry none and
    are replicated. AdamW keeps mu and nu like the parameters, all float32. The batch
    (inputs and targets, int32) is split over data x fsdp.
    """
    mc = tasks.make_task(config, None, prepare_data=False).model_config
    h, n, f, k = mc.d_model, mc.d_state, mc.d_ff, mc.num_layers
    assert mc.glu == "full" and not mc.bidirectional and h % fsdp == 0
    replicated = k * (3 * n + 2 * h + f)
    params = (mc.num_params() - replicated) // fsdp + replicated
    batch = 2 * (BATCH // (data * fsdp)) * SEQ * 4
    return 3 * 4 * params + batch


def _train_report(topology, **mesh):
    config = _config(**mesh)
    return config, compile_lib.compile_for_topology(config, topology, include_eval=False)


@pytest.mark.parametrize(
    "topology, data, fsdp",
    [("v5e:2x2", 2, 2), ("v4:2x2x2", 4, 2)],
)
def test_tiny_compiles_and_arguments_match_shardings(topology, data, fsdp):
    config, r = _train_report(topology, data=data, fsdp=fsdp)
    assert r.chips == data * fsdp and r.mesh["data"] == data and r.mesh["fsdp"] == fsdp
    assert r.fits and r.train.compiler_fits and r.train.measured
    expected = _expected_argument_bytes(config, data, fsdp)
    # Within 2%: TPU layouts pad a few small arrays, and the step counters add bytes.
    assert r.train.argument_bytes == pytest.approx(expected, rel=0.02)
    # The donated state is reused for the new state, not held twice.
    assert r.train.alias_bytes >= 0.95 * r.state_bytes
    # Resident = XLA's peak of live buffers, which holds the arguments.
    assert r.train.total_bytes == r.train.xla_peak_bytes > r.train.argument_bytes
    # FSDP gathers parameters and data parallelism reduces gradients.
    assert r.train.collectives["all-gather"]["count"] > 0
    assert (
        r.train.collectives["all-reduce"]["count"] + r.train.collectives["reduce-scatter"]["count"]
        > 0
    )
    assert r.model_flops_per_step > 0 and 0 < r.mfu_bound <= 1


def test_a_data_and_fsdp_mesh_gathers_weights_not_activations(monkeypatch):
    """On a (data=4, fsdp=2) slice, FSDP's all-gathers in the compiled train step are of
    weights. The embedding's gradient used to reshard its (batch, length, width)
    cotangent from batch- to width-sharded, which XLA's partitioner can only do by
    gathering the whole global array on every chip ("involuntary full
    rematerialization"); lrulm.layers._lookup now moves the cotangent's fsdp factor from
    batch to width itself (an all-to-all)."""
    texts = []
    parse = compile_lib.collectives
    monkeypatch.setattr(compile_lib, "collectives", lambda text: texts.append(text) or parse(text))
    _, r = _train_report("v5e:2x4", data=4, fsdp=2)
    assert r.fits and r.train.measured and len(texts) == 1
    gathered = [
        [int(d) for d in dims.split(",") if d]
        for dims in re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\S* all-gather(?:-start)?\(", texts[0])
    ]
    assert gathered, "FSDP gathers the weights"
    assert not [g for g in gathered if g[:2] == [BATCH, SEQ]], gathered


def test_fsdp_shards_the_state():
    """Doubling the fsdp axis on 16 chips roughly halves the per-chip state."""
    reports = {fsdp: _train_report("v5e:4x4", data=16 // fsdp, fsdp=fsdp)[1] for fsdp in (2, 4)}
    ratio = reports[2].train.argument_bytes / reports[4].train.argument_bytes
    # Not exactly 2: the replicated (state,) vectors and biases do not shrink.
    assert 1.8 < ratio < 2.05, ratio


def test_too_large_is_reported_with_the_shortfall(capsys, tmp_path):
    """The 1.3b preset, data-parallel on four v5e chips, needs more than 16 GiB a chip."""
    config = config_lib.load_with_overrides(
        "configs/lm/tiny.py",
        [("model.preset", "1.3b"), ("train.seq_len", "2048"), ("train.global_batch_size", "32")],
    )
    # XLA refuses it in seconds (measure_overflow, off by default, would compile it again).
    path = tmp_path / "report.json"
    code = compile_lib.main(config, "v5e-4", json_path=str(path))
    out = capsys.readouterr().out
    assert code == 1
    assert "DOES NOT FIT" in out and "GiB over" in out
    # The state alone: 1.34B float32 parameters + AdamW's mu and nu, replicated.
    assert "arguments 15.0" in out
    assert "--config.mesh.fsdp=" in out  # sharding the 15 GiB of state is the way out
    assert "MFU bound: none (the train step did not compile)" in out
    saved = json.loads(path.read_text())
    assert saved["mfu_bound"] is None
    assert saved["fits"] is False and saved["shortfall_bytes"] > 0 and saved["chips"] == 4
    # XLA's figure in its refusal is the whole peak, arguments included: not added to them.
    needed, _ = compile_lib._parse_oom(saved["train"]["oom_message"])
    assert saved["peak_bytes"] == needed > saved["train"]["argument_bytes"]


def test_bad_mesh_fails_before_compiling():
    with pytest.raises(ValueError, match="multiply to 3 but there are 4 devices"):
        compile_lib.compile_for_topology(_config(data=3), "v5e:2x2")
    # A batch the slice's data axis cannot split names the slice too.
    config = _config(data=4)
    with config.unlocked():
        config.train.global_batch_size = 6
    with pytest.raises(ValueError, match=r"^v5e-4 \(4 chips\): global batch 6 .* 4"):
        compile_lib.compile_for_topology(config, "v5e:2x2")


def test_devices_are_chips():
    """v4 is described as one device per chip (megacore), as a v4 VM shows it."""
    devices = compile_lib.topology_devices(compile_lib.parse_topology("v4-16"))
    assert len(devices) == 8 and devices[0].device_kind == "TPU v4"


def test_collectives_parser():
    hlo = """
  %ag = bf16[8,1024]{1,0} all-gather(bf16[2,1024]{1,0} %p), dimensions={0}
  %ars = (f32[4,128]{1,0}, f32[4,128]{1,0}) all-reduce-start(f32[4,128]{1,0} %x)
  %ard = f32[4,128]{1,0} all-reduce-done((f32[4,128]{1,0}, f32[4,128]{1,0}) %ars)
  %cp = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %y)
"""
    c = compile_lib.collectives(hlo)
    assert c["all-gather"] == {"count": 1, "bytes": 8 * 1024 * 2, "largest": 8 * 1024 * 2}
    assert c["all-reduce"] == {"count": 1, "bytes": 4 * 128 * 4, "largest": 4 * 128 * 4}
    assert c["collective-permute"] == {"count": 1, "bytes": 16 * 4, "largest": 16 * 4}
    two = compile_lib.collectives(hlo + "  %ag2 = f32[64,1024]{1,0} all-gather(f32[8,1024] %q)\n")
    assert two["all-gather"] == {"count": 2, "bytes": 16384 + 262144, "largest": 262144}
    assert c["reduce-scatter"]["count"] == 0 and c["all-to-all"]["count"] == 0


@pytest.mark.parametrize(
    "mesh, dcn, want",
    [
        # One slice of 16 chips, data parallel: FSDP over 4 is the smallest that fits.
        (dict(data=16, fsdp=1, tensor=1, sequence=1), {}, "fsdp=4 --config.mesh.data=4"),
        # Tensor is sized -1 in the config: both sizes written out, no second -1.
        (dict(data=8, fsdp=1, tensor=2, sequence=1), {}, "fsdp=4 --config.mesh.data=2"),
        # Two slices over data (dcn_data=2): per-slice data 2 x 2 slices x fsdp 4 = 16.
        (dict(data=16, fsdp=1, tensor=1, sequence=1), {"data": 2}, "fsdp=4 --config.mesh.data=2"),
        # FSDP across 2 slices (state 30 GiB at fsdp 2): the whole fsdp 8 is 4 per slice.
        (dict(data=8, fsdp=2, tensor=1, sequence=1), {"fsdp": 2}, "fsdp=4 --config.mesh.data=2"),
    ],
)
def test_fsdp_suggestion_names_sizes_per_slice(mesh, dcn, want):
    """The advice to shard the state writes out data and fsdp as the config takes them
    (within a slice) instead of data=-1, which clashed with an axis sized -1 and ignored
    the slices."""
    import dataclasses

    gib = compile_lib.GIB
    fields = {f.name: None for f in dataclasses.fields(compile_lib.StepReport)}
    step = compile_lib.StepReport(**{
        **fields, "argument_bytes": 30 * gib, "output_bytes": 0, "alias_bytes": 0,
        "temp_bytes": 2 * gib, "code_bytes": 0, "collectives": {}, "compiler_fits": False,
        "has_loops": False,
    })  # fmt: skip
    rfields = {f.name: None for f in dataclasses.fields(compile_lib.Report)}
    report = compile_lib.Report(**{
        **rfields, "chips": 16, "hbm_bytes": 16 * gib, "mesh": mesh, "dcn": dcn,
        "train": step, "remat": "full", "dtype": "bfloat16", "global_batch": 16,
        "grad_accum_steps": 1,
    })  # fmt: skip
    advice = compile_lib.suggestions(report)
    assert any(f"--config.mesh.{want}" in line for line in advice), advice
    assert not any("=-1" in line for line in advice), advice
