"""The LM trainer: sharding changes layout not math, accumulation, evaluation, errors."""

import glob
import gzip
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from run_helpers import TINY
from run_helpers import tiny_config as _config

from lrulm import config as config_lib
from lrulm import experiment, tasks, train
from lrulm import metrics as metrics_lib


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_sharding_changes_layout_not_math(tmp_path, corpus):
    common = [
        "train.steps=6",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every_steps=100",
    ]
    meshes = {
        "data8": (["mesh.data=8"], None),
        "dp2_fsdp2_tp2": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], None),
        "one_device": (["mesh.data=1"], jax.devices()[:1]),
    }
    losses = {}
    for name, (mesh, devices) in meshes.items():
        workdir = str(tmp_path / name)
        train.train_and_evaluate(_config(*common, *mesh, corpus=corpus), workdir, devices=devices)
        losses[name] = _losses(workdir)
    ref = losses["one_device"]
    assert sorted(ref) == list(range(1, 7))
    assert ref[6] < ref[1]  # it learns
    for name, got in losses.items():
        np.testing.assert_allclose(
            [got[s] for s in ref], list(ref.values()), rtol=2e-4, err_msg=name
        )


def test_muon_trains_alike_on_a_sharded_mesh(tmp_path, corpus):
    """optim.optimizer=muon: its momentum sharded as the matrices (FSDP x tensor), the
    same losses as on one device, and it learns."""
    common = ["train.steps=6", "train.log_every=1", "train.eval_every=0",
              "checkpoint.every_steps=100", "optim.optimizer=muon"]  # fmt: skip
    losses = {}
    meshes = [
        ("sharded", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], None),
        ("one_device", ["mesh.data=1"], jax.devices()[:1]),
    ]
    for name, mesh, devices in meshes:
        workdir = str(tmp_path / name)
        train.train_and_evaluate(_config(*common, *mesh, corpus=corpus), workdir, devices=devices)
        losses[name] = _losses(workdir)
    ref = losses["one_device"]
    assert ref[6] < ref[1]
    np.testing.assert_allclose([losses["sharded"][s] for s in ref], list(ref.values()), rtol=2e-4)


def test_pallas_scan_trains_like_sequential_on_a_sharded_mesh(tmp_path, corpus):
    """model.scan_method=pallas (the GPU kernel, interpreted on CPU) in the real train step,
    on a (data=2, fsdp=2, tensor=2) mesh with document resets: the same losses as lax.scan."""
    common = [
        "train.steps=3",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every_steps=100",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    ]
    losses = {}
    for method in ("sequential", "pallas"):
        workdir = str(tmp_path / method)
        config = _config(*common, f"model.scan_method={method}", corpus=corpus)
        train.train_and_evaluate(config, workdir)
        losses[method] = _losses(workdir)
    assert sorted(losses["pallas"]) == [1, 2, 3]
    np.testing.assert_allclose(
        [losses["pallas"][s] for s in (1, 2, 3)],
        [losses["sequential"][s] for s in (1, 2, 3)],
        rtol=1e-5,
    )


def test_parameters_are_sharded_by_the_rules(corpus, tmp_path):
    config = _config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", corpus=corpus)
    mesh = experiment.make_mesh(config)
    task = tasks.make_task(config, str(tmp_path))
    exp = experiment.build(config, task, mesh)
    state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
    blocks = state["params"]["stack"]["blocks"]
    # (layers, state, embed): state channels split by tensor, width by fsdp.
    assert blocks["lru"]["B_re"].sharding.spec == P(None, "tensor", "fsdp")
    assert blocks["lru"]["C_im"].sharding.spec == P(None, "fsdp", "tensor")
    assert blocks["mlp_in"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert state["params"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    # Each device holds a quarter of B: 2 (tensor) x 2 (fsdp).
    b = blocks["lru"]["B_re"]
    assert b.addressable_shards[0].data.size * 4 == b.size
    # Adam's moments follow their parameters.
    mu = jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
    mus = [m.mu for m in mu if hasattr(m, "mu")]
    shardings = {x.sharding.spec for m in mus for x in jax.tree.leaves(m) if x.ndim == 3}
    assert P(None, "tensor", "fsdp") in shardings


def test_gradient_accumulation_equals_big_batch(corpus, tmp_path):
    results = {}
    for accum in (1, 4):
        config = _config(f"optim.grad_accum_steps={accum}", "mesh.data=2", corpus=corpus)
        mesh = experiment.make_mesh(config, jax.devices()[:2])
        task = tasks.make_task(config, str(tmp_path))
        exp = experiment.build(config, task, mesh)
        state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
        train_jit, _ = train.jit_steps(exp)
        rng = np.random.default_rng(0)
        batch = {
            k: rng.integers(4, 500, shape).astype(np.int32)
            for k, (shape, _) in exp.batch_spec.items()
        }
        batch = {k: jax.device_put(v, exp.batch_shardings[k]) for k, v in batch.items()}
        state, metrics = train_jit(state, batch)
        results[accum] = (jax.device_get(state["params"]), jax.device_get(metrics))
    p1, m1 = results[1]
    p4, m4 = results[4]
    np.testing.assert_allclose(m4["train/loss"], m1["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["train/grad_norm"], m1["train/grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.global_batch_size=12", "mesh.data=8"], "global batch 12 is not divisible by 8"),
        (["mesh.data=3"], "multiply to 3 but there are 8 devices"),
        (["mesh.data=-1", "mesh.fsdp=3"], "make the other axes divide 8"),
        (["optim.grad_accum_steps=3"], "accumulation steps; use a multiple of 24"),
        (
            ["data.train_files=/nonexistent/*.txt", "data.eval_files=/nonexistent/*.txt"],
            "matches no files",
        ),
        (["train.seq_len=50000000"], "fewer than one sequence"),
        (["train.profile_steps=-1"], "must be >= 0"),
        (["optim.no_decay=scale$,bais$"], r"'bais\$' finds none of this model's decayed"),
        (["checkpoint.every_steps=0"], "checkpoint.every_steps must be positive"),
        (["train.eval_every=-1"], "train.eval_every must be >= 0"),
        (["train.profile_steps=2", "train.profile_start_step=20"], "no step would be profiled"),
    ],
)
def test_bad_input_fails_before_compiling(tmp_path, corpus, overrides, message):
    if not any(o.startswith("data.train_files") for o in overrides):
        overrides = overrides + [
            f"data.train_files={corpus['train']}",
            f"data.eval_files={corpus['eval']}",
        ]
    config = _config(*overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


@pytest.mark.parametrize(
    "start, count, run_from, total, window",
    [
        (1, 2, 0, 20, (1, 3)),  # the default start: after the compiling first step
        (0, 2, 0, 20, (1, 2)),  # step 1 compiles, so it is never traced
        (5, 3, 0, 6, (5, 6)),  # cut at the last step
        (5, 3, 6, 20, (7, 8)),  # resumed inside the window: after its compiling step
        (5, 3, 8, 20, None),  # resumed after the window
        (5, 0, 0, 20, None),  # off
    ],
)
def test_profile_window_steps(start, count, run_from, total, window):
    profile = metrics_lib.ProfileWindow(
        "unused", start_step=start, num_steps=count, run_from=run_from, total_steps=total
    )
    assert profile.window == window


def test_a_resumed_run_moves_the_rows_after_its_checkpoint_aside(tmp_path, capsys):
    """Rows a crashed run wrote after its last checkpoint would be written again by the
    resumed run: they move to metrics.superseded.jsonl (nothing is deleted)."""
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True, progress=False)
    for step in (0, 5, 10, 15):
        writer.write(step, {"train/loss": 1.0})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2')  # a line cut short by the crash
    metrics_lib.MetricWriter(str(tmp_path), enabled=True, start_step=10).close()
    steps = lambda name: [json.loads(line)["step"] for line in open(tmp_path / name)]
    assert steps("metrics.jsonl") == [0, 5, 10]
    assert open(tmp_path / "metrics.superseded.jsonl").read().splitlines()[1] == '{"step": 2'
    assert (
        "2 rows of metrics.jsonl (after step 10, written after the last" in capsys.readouterr().out
    )
    metrics_lib.MetricWriter(str(tmp_path), enabled=True, start_step=10).close()
    assert steps("metrics.jsonl") == [0, 5, 10]  # nothing more to move
    # A fresh run (no checkpoint) in the same workdir: every row is an earlier run's.
    metrics_lib.MetricWriter(str(tmp_path), enabled=True, fresh=True).close()
    assert steps("metrics.jsonl") == []
    moved = open(tmp_path / "metrics.superseded.jsonl").read().splitlines()[-3:]
    assert [json.loads(line)["step"] for line in moved] == [0, 5, 10]
    assert "3 rows of metrics.jsonl (an earlier run's" in capsys.readouterr().out


def test_console_lines_read_as_numbers(tmp_path, capsys):
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
    metrics = {"train/loss": 3.75183, "perf/tokens_per_s": 10040.4, "eval/tokens": 32768.0}
    writer.progress_line(20, 40, metrics)
    writer.summary_line("eval at step 20", {**metrics, "eval/loss": float("nan")})
    writer.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("20/40 loss 3.752 tokens_per_s 10,040 tokens 32,768")
    assert lines[1].endswith(
        "eval at step 20: loss 3.752 tokens_per_s 10,040 tokens 32,768 loss nan"
    )


def _dispatches(trace_file, name):
    """How many times `name` was called in a trace (each call logs nested events)."""
    events = json.load(gzip.open(trace_file))["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == name)
    outer, end = 0, -1.0
    for start, stop in spans:
        if start >= end:
            outer, end = outer + 1, stop
    return outer


def test_profile_traces_the_steps_of_the_window(tmp_path, corpus, capsys):
    """A trace TensorBoard and Perfetto read, holding exactly the window's train steps; a
    resumed run traces from the step after the one it compiles at."""
    workdir = str(tmp_path / "run")
    common = ["train.log_every=1", "train.eval_every=0", "checkpoint.every_steps=4"]
    profile = ["train.profile_start_step=1", "train.profile_steps=2"]
    train.train_and_evaluate(_config("train.steps=4", *common, *profile, corpus=corpus), workdir)
    traces = glob.glob(f"{workdir}/tensorboard/plugins/profile/*/*.trace.json.gz")
    assert len(traces) == 1 and glob.glob(f"{workdir}/tensorboard/plugins/profile/*/*.xplane.pb")
    assert _dispatches(traces[0], "PjitFunction(train_step)") == 2
    assert "profile of steps 2..3 written" in capsys.readouterr().out

    time.sleep(1.1)  # trace folders are named by the second
    profile = ["train.profile_start_step=4", "train.profile_steps=3"]  # steps 5..7
    train.train_and_evaluate(_config("train.steps=8", *common, *profile, corpus=corpus), workdir)
    new = set(glob.glob(f"{workdir}/tensorboard/plugins/profile/*/*.trace.json.gz")) - set(traces)
    assert len(new) == 1
    assert _dispatches(new.pop(), "PjitFunction(train_step)") == 2  # step 5 compiled
    assert "profile of steps 6..7 written" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr must be positive; got nan"),
        ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
        ("optim.grad_clip=-1", r"optim.grad_clip must be >= 0 \(0: no clipping\)"),
        ("optim.b2=1.5", r"optim.b2 must be in \[0, 1\)"),
        ("optim.warmup_fraction=1.5", r"optim.warmup_fraction must be in \[0, 1\]"),
        ("data.seed=-2", r"data.seed must be in \[0, 2\*\*32\), or -1"),
        ("train.z_loss=-1", r"train.z_loss must be >= 0 \(0: off\)"),
        ("train.label_smoothing=1.0", r"train.label_smoothing must be in \[0, 1\)"),
        ("data.eval_sets=x", r"data.eval_sets: 'x' is not NAME=GLOBS"),
        ("data.mixture=a=x@1", "data.mixture has one part"),
        ("checkpoint.init_from_params=^stack/", "which is not set; give both"),
        ("checkpoint.init_from=/x,checkpoint.init_from_params=stack/(", "init_from_params: 'st"),
        ("optim.ema=1.5", r"optim.ema must be in \[0, 1\)"),
        ("checkpoint.every_minutes=-1", "checkpoint.every_minutes must be >= 0"),
        ("optim.schedule=cosin", "optim.schedule must be one of cosine, linear, constant, wsd"),
        ("optim.schedule=wsd,optim.decay_fraction=0.95", r"decay_fraction must be in \(0, 1 -"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\)"),
        ("model.d_ff=-5", "model.d_ff must be >= 0"),
        ("model.r_max=1.0", "r_max=1.0 would let"),
        ("model.scan_method=foo", "model.scan_method: unknown scan method 'foo'"),
        ("model.norm=batch", "model.norm='batch' is for the LRA classifiers"),
    ],
)
def test_bad_optimizer_and_model_values_fail_before_the_data_is_prepared(
    tmp_path, corpus, override, message
):
    """Checked with the mesh, before a tokenizer is trained or the corpus tokenized into
    the workdir (they came after both, or not at all: NaN, negative decay or clipping)."""
    config = _config(*override.split(","), corpus=corpus)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # nothing written, no empty workdir left


def test_step_time_leaves_out_evaluation_and_saving(tmp_path, corpus, monkeypatch):
    """Evaluations and saves between two log steps were timed as train steps; the time
    the host waits for each batch (here a slow input pipeline: 0.1 s) is its own figure."""
    from lrulm import evaluation

    real, real_to_global = evaluation.evaluate, train.to_global

    def slow_evaluate(*args):
        time.sleep(1.0)
        return real(*args)

    def slow_batch(*args):
        time.sleep(0.1)
        return real_to_global(*args)

    monkeypatch.setattr(evaluation, "evaluate", slow_evaluate)
    monkeypatch.setattr(train, "to_global", slow_batch)
    overrides = ["train.steps=10", "train.log_every=5", "train.eval_every=3", "train.eval_steps=1"]
    config = _config(*overrides, "checkpoint.every_steps=4", corpus=corpus)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    times = {r["step"]: r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r}
    assert sorted(times) == [5, 10] and max(times.values()) < 0.6, times
    waits = {r["step"]: r["perf/data_wait_s"] for r in rows if "perf/data_wait_s" in r}
    assert all(0.1 <= waits[s] <= times[s] for s in times), (waits, times)
    assert not any("perf/memory_gib" in r for r in rows)  # CPUs report no memory figures


def test_device_memory_reports_the_most_loaded_device():
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    gib = 2**30
    devices = [
        Device({"bytes_in_use": 1 * gib, "peak_bytes_in_use": 3 * gib, "bytes_limit": 8 * gib}),
        Device({"bytes_in_use": 2 * gib, "peak_bytes_in_use": 2 * gib, "bytes_limit": 8 * gib}),
        Device(None),
        Device(NotImplementedError()),
    ]
    assert metrics_lib.device_memory(devices) == {
        "perf/memory_gib": 1.0, "perf/peak_memory_gib": 3.0, "perf/peak_memory_fraction": 0.375
    }  # fmt: skip
    assert metrics_lib.device_memory(devices[2:]) == {}


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    config = _config(f"data.train_files={empty}", f"data.eval_files={empty}")
    with pytest.raises(ValueError, match="every file is empty"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "data, fsdp, tensor", [(1, 1, 1), (4, 2, 1), (1, 8, 1), (2, 2, 2), (8, 1, 1)]
)
def test_embedding_lookup_and_gradient_on_each_mesh_layout(data, fsdp, tensor):
    """The embedding's lookup (lrulm.layers._lookup: a table gathered over fsdp, and a
    gradient that moves the cotangent's fsdp factor from batch to width) gives
    jnp.take's values and gradient (repeated tokens summed) on every layout."""
    from lrulm import layers, sharding

    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 8, (8, 16)), jnp.int32)  # many repeats
    weights = jnp.asarray(rng.normal(size=(8, 16, 32)), jnp.float32)
    loss = lambda lookup, t: jnp.sum(weights * lookup(t, tokens) ** 2)
    want = jax.value_and_grad(lambda t: loss(lambda t, i: jnp.take(t, i, axis=0), t))(table)
    devices = jax.devices()[: data * fsdp * tensor]
    mesh = sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices)
    with sharding.activation_sharding(mesh):
        got = jax.jit(jax.value_and_grad(lambda t: loss(layers._lookup, t)))(table)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    # Token arrays of other ranks (one position per row, rows of pairs) take it too.
    sum_sq = lambda lookup: lambda t, ids: jnp.sum(lookup(t, ids) ** 2)
    take = lambda t, ids: jnp.take(t, ids, axis=0)
    for ids in (tokens[:, 0], tokens.reshape(8, 2, 8)):
        want = jax.grad(sum_sq(take))(table, ids)
        with sharding.activation_sharding(mesh):
            got = jax.jit(jax.grad(sum_sq(layers._lookup)))(table, ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _step_program(*overrides):
    config = config_lib.load_with_overrides(
        TINY,
        [("model.vocab_size", "512"), ("mesh.data", "1")]
        + [tuple(o.split("=")) for o in overrides],
    )
    mesh = experiment.make_mesh(config, jax.devices()[:1])
    exp = experiment.build(config, tasks.make_task(config, None, prepare_data=False), mesh)
    train_jit, _ = train.jit_steps(exp)
    batch = {
        k: jax.ShapeDtypeStruct(s, d, sharding=exp.batch_shardings[k])
        for k, (s, d) in exp.batch_spec.items()
    }
    return exp, train_jit, train_jit.lower(exp.abstract_state, batch)


def test_depth_is_a_scan_so_the_program_does_not_grow():
    sizes = {k: len(_step_program(f"model.num_layers={k}")[2].as_text()) for k in (2, 8)}
    assert abs(sizes[8] - sizes[2]) < 0.02 * sizes[2], sizes
    unrolled = len(_step_program("model.num_layers=8", "model.scan_layers=False")[2].as_text())
    assert unrolled > 2 * sizes[8]


@pytest.mark.parametrize(
    "mesh, widths, warned",
    [
        (["mesh.data=1", "mesh.fsdp=8"], [], False),
        (["mesh.data=1", "mesh.fsdp=8"], ["model.d_model=36"], True),
        (["mesh.data=4", "mesh.tensor=2"], [], False),
        (["mesh.data=1", "mesh.tensor=8"], ["model.d_state=36", "model.d_ff=36"], True),
    ],
)
def test_sizes_that_do_not_divide_the_mesh_are_said(mesh, widths, warned, capsys):
    """spec_for keeps an array whole on an axis its dimension does not divide by; when
    that leaves much of the model unsplit, the run says so (not a silent replica)."""
    config = _config("model.vocab_size=512", *mesh, *widths)
    exp = experiment.build(
        config, tasks.make_task(config, None, prepare_data=False), experiment.make_mesh(config)
    )
    out = capsys.readouterr().out
    assert ("are not split over the mesh axes meant to split them" in out) == warned, out
    if warned:
        axis = "fsdp=8" if "mesh.fsdp=8" in mesh else "tensor=8"
        assert f"(36) over {axis}" in out
    # The warning tells the truth: the share of the parameters' bytes on one device.
    sizes = lambda f: [f(s, x) for s, x in zip(*map(jax.tree.leaves, (shardings, abstract)))]
    shardings, abstract = exp.state_shardings["params"], exp.abstract_state["params"]
    held = sum(sizes(lambda s, x: math.prod(s.shard_shape(x.shape))))
    share = held / sum(sizes(lambda s, x: math.prod(x.shape)))
    split = exp.mesh.shape["fsdp"] * exp.mesh.shape["tensor"]
    assert share > 2 / split if warned else share < 1.5 / split, share


def test_remat_policies_change_memory_not_math():
    rng = np.random.default_rng(0)
    results = {}
    for policy in ("none", "full", "dots", "lru"):
        exp, train_jit, lowered = _step_program(f"model.remat={policy}", "train.seq_len=256")
        temp = lowered.compile().memory_analysis().temp_size_in_bytes
        state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
        batch = {
            k: rng.integers(4, 500, s).astype(np.int32) for k, (s, _) in exp.batch_spec.items()
        }
        rng = np.random.default_rng(0)
        state, metrics = train_jit(state, batch)
        results[policy] = (temp, float(metrics["train/loss"]), float(metrics["train/grad_norm"]))
    for policy, (_, loss, norm) in results.items():
        np.testing.assert_allclose(loss, results["none"][1], rtol=1e-6, err_msg=policy)
        np.testing.assert_allclose(norm, results["none"][2], rtol=1e-5, err_msg=policy)
    print({p: f"{t / 2**20:.1f} MiB" for p, (t, _, _) in results.items()})
    assert results["full"][0] < 0.7 * results["none"][0]


def test_remat_wraps_each_layer_when_layers_are_not_scanned():
    """With model.scan_layers=False each block is its own rematerialised call (outside a
    scan, jax marks its recomputation with an optimization barrier so that XLA cannot
    merge it back into the forward pass); the step's math is unchanged."""
    results = {}
    for policy in ("none", "full"):
        exp, train_jit, lowered = _step_program(
            f"model.remat={policy}", "model.scan_layers=False", "model.num_layers=3"
        )
        results[policy] = lowered.as_text().count("stablehlo.optimization_barrier")
        state = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)(jax.random.key(0))
        rng = np.random.default_rng(0)
        batch = {
            k: rng.integers(4, 500, s).astype(np.int32) for k, (s, _) in exp.batch_spec.items()
        }
        _, metrics = train_jit(state, batch)
        results[policy, "norm"] = float(metrics["train/grad_norm"])
    assert results["none"] == 0 and results["full"] == 3, results
    np.testing.assert_allclose(results["full", "norm"], results["none", "norm"], rtol=1e-5)


@pytest.mark.parametrize(
    "block,dtype",
    [(0, "float32"), (128, "float32"), (300, "float32"), (0, "bfloat16"), (300, "bfloat16")],
)
def test_vocab_blocked_loss_equals_the_full_softmax(block, dtype):
    """The blocked loss (its hand-written VJP) against optax on the whole logits; the
    per-position weights make the cotangent differ between positions."""
    from lrulm.model import cross_entropy_and_lse

    rng = np.random.default_rng(block)
    x = jnp.asarray(rng.normal(size=(2, 9, 16)), dtype)
    w = jnp.asarray(rng.normal(size=(16, 1024)), dtype)
    targets = rng.integers(0, 1024, (2, 9))
    best = np.asarray(jnp.einsum("blh,hv->blv", x, w, preferred_element_type=jnp.float32))
    targets[:, ::2] = best[:, ::2].argmax(-1)  # right predictions, from several blocks
    targets = jnp.asarray(targets, jnp.int32)

    weights = jnp.linspace(0.5, 1.5, 9)
    z = 0.01  # a z-loss on log Z: its gradient goes through the log-partition output

    def total(x, w, block):
        losses, lse, correct = cross_entropy_and_lse(x, w, targets, vocab_block=block)
        return jnp.sum((losses + z * lse**2) * weights), correct

    def reference(x, w):  # optax on the whole logits, in float32
        logits = jnp.einsum("blh,hv->blv", x, w, preferred_element_type=jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        lse = jax.nn.logsumexp(logits, -1)
        return jnp.sum((losses + z * lse**2) * weights), jnp.argmax(logits, -1) == targets

    (ref, ref_ok), ref_grads = jax.value_and_grad(reference, (0, 1), has_aux=True)(x, w)
    (got, ok), grads = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True), static_argnums=2)(
        x, w, block
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_array_equal(ok, ref_ok)
    assert ok[:, ::2].all() and not ok[:, 1::2].any()
    tol = 1e-5 if dtype == "float32" else 1e-2  # bf16 gradients: relative to their scale
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("preset", ["test", "tiny"])
def test_initial_logits_have_unit_scale(tie, preset):
    """Tied embeddings (N(0, 1)) are scaled by d_model**-0.5 in the head, as the untied
    head's init is: the first loss is near ln(vocab), whatever the width."""
    from flax import nnx

    from lrulm.model import LanguageModel
    from lrulm.model_config import from_preset

    model = LanguageModel(from_preset(preset, vocab_size=512, tie_embeddings=tie), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 64)))
    assert 0.8 < float(jnp.std(model(tokens))) < 1.25


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_model_logits_are_the_ones_the_loss_trains(tie):
    """Generation and `lrulm eval` read the model's logits; training reads cross_entropy
    (blocked or not). In a bfloat16 model all three are the float32 product of the
    bfloat16 features and head: none is rounded to bfloat16 first."""
    from flax import nnx

    from lrulm.model import LanguageModel, cross_entropy
    from lrulm.model_config import from_preset

    cfg = from_preset("test", vocab_size=512, dtype="bfloat16", tie_embeddings=tie)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    scale = 8.0  # logits of a trained model's size: bf16 rounding would cost ~0.03 nats
    logits = scale * model(tokens)
    from_logits = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    x = model.features(tokens)
    w = model.head_weight(x.dtype) * jnp.asarray(scale, x.dtype)
    for block in (0, 128):
        losses, _ = cross_entropy(x, w, targets, vocab_block=block)
        np.testing.assert_allclose(losses, from_logits, rtol=1e-5, atol=1e-5)
        # ... and the gradient's matmuls stay bfloat16 (float32 accumulation): autodiff of
        # a float32 product would make both backward matmuls float32.
        grad = jax.grad(lambda x, w, b=block: cross_entropy(x, w, targets, vocab_block=b)[0].sum())
        dots = _equations(jax.make_jaxpr(grad)(x, w).jaxpr, "dot_general")
        assert dots and {str(v.aval.dtype) for e in dots for v in e.invars} == {"bfloat16"}


def _equations(jaxpr, name: str) -> list:
    """The equations of a primitive in jaxpr and every jaxpr inside it."""
    found = [e for e in jaxpr.eqns if e.primitive.name == name]
    for e in jaxpr.eqns:
        for param in e.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _equations(inner, name)
    return found


def test_vocab_blocked_loss_gradient_has_no_scatter():
    """The target's logit is picked by a compare inside each block, in the forward and in
    the hand-written backward: no gather, so no scatter in the gradient (XLA's TPU
    compiler builds that scatter as several (length, block) buffers at batch 1)."""
    from lrulm.model import cross_entropy

    def total(x, w, targets):
        return jnp.sum(cross_entropy(x, w, targets, vocab_block=128)[0])

    args = (jnp.zeros((1, 64, 16), jnp.bfloat16), jnp.zeros((16, 500), jnp.bfloat16),
            jnp.zeros((1, 64), jnp.int32))  # fmt: skip
    hlo = jax.jit(jax.grad(total, (0, 1))).lower(*args).as_text()
    assert "while" in hlo  # the blocks are a loop
    for op in ("scatter", "gather"):
        assert f"stablehlo.{op}" not in hlo, op


def test_vocab_blocked_loss_saves_memory():
    sizes = {}
    for block in (0, 512):
        _, _, lowered = _step_program(
            f"train.loss_vocab_block={block}", "train.seq_len=512", "model.remat=full",
            "model.vocab_size=4096",
        )  # fmt: skip
        sizes[block] = lowered.compile().memory_analysis().temp_size_in_bytes
    print({b: f"{t / 2**20:.0f} MiB" for b, t in sizes.items()})
    assert sizes[512] < 0.5 * sizes[0], sizes
