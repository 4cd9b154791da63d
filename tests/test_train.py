"""The LM trainer: sharding changes layout not math, accumulation, evaluation, errors. The
compiled step's program (depth as a scan, remat, the vocabulary-blocked loss, logits):
test_step_program.py."""

import glob
import gzip
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from run_helpers import logged_losses as _losses
from run_helpers import tiny_config as _config

from lrulm import experiment, tasks, train
from lrulm import metrics as metrics_lib


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
