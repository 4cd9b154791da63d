"""Checkpoints: damage, changed configs and data, another mesh, plain Orbax, the best
checkpoint, saves by time. Stopping and resuming (signals, limits): test_preemption.py."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import (
    TINY,
    logged_losses,
    run_train,
    saved_params,
    train_args,
    train_here,
)

from lrulm import best_checkpoint as best_lib
from lrulm import checkpoint as ckpt_lib
from lrulm import config as config_lib
from lrulm import evaluation, experiment, tasks, train


@pytest.fixture(scope="session")
def _four_steps(tmp_path_factory, corpus):
    """`lrulm train` of tiny:test to step 4, checkpoints at steps 2 and 4: where the
    resume tests below start (each from a copy of its own)."""
    workdir = tmp_path_factory.mktemp("four_steps") / "run"
    run_train(workdir, corpus, "train.steps=4", "checkpoint.every_steps=2")
    return workdir


@pytest.fixture
def four_step_run(_four_steps, tmp_path):
    """A copy of _four_steps' workdir: tmp_path/run."""
    workdir = tmp_path / "run"
    shutil.copytree(_four_steps, workdir)
    return workdir


def test_damaged_checkpoint_is_named_and_skipped(tmp_path, corpus, damage_checkpoint):
    workdir = tmp_path / "run"
    run_train(workdir, corpus, "train.steps=8", "checkpoint.every_steps=4")
    damage_checkpoint(workdir / "checkpoints" / "8")
    # And a save killed mid-write: Orbax's temporary directory, never committed.
    partial = workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "state").mkdir()
    # `lrulm eval` skips it but moves nothing: it only reads.
    config = config_lib.load_with_overrides(
        TINY, [("data.train_files", corpus["train"]), ("data.eval_files", corpus["eval"])]
    )
    assert evaluation.evaluate_workdir(config, str(workdir))["step"] == 4
    assert not (workdir / "corrupt_checkpoints").exists()
    out = run_train(workdir, corpus, "train.steps=10", "checkpoint.every_steps=4")
    assert f"checkpoint {workdir}/checkpoints/8 is damaged" in out
    assert f"resumed from {workdir}/checkpoints/4" in out
    kept = glob.glob(str(workdir / "corrupt_checkpoints" / "8-*"))
    assert kept, "the damaged checkpoint must be kept for inspection, not deleted"
    assert max(logged_losses(workdir)) == 10
    assert not os.path.exists(workdir / "checkpoints" / "12")  # the partial one was never used


def test_changed_config_is_an_error_not_damage(corpus, four_step_run, lrulm_here):
    """A resume (or eval) with another model's config names the differing arrays and
    changes nothing: no checkpoint moved, the workdir's config.json kept. A resume with
    compatible changes says which keys changed."""
    workdir = four_step_run
    config_before = (workdir / "config.json").read_text()
    bad = lrulm_here(*train_args(
        workdir, corpus, "train.steps=6", "checkpoint.every_steps=2", "model.d_model=48",
        "model.dropout=0.1",
    ))  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "checkpoints/4 was saved by a run with another model or optimizer config" in (bad.stderr)
    assert "params/embed/embedding: checkpoint (512, 32) vs this run (512, 48)" in bad.stderr
    # The setting to set back, not the dropout (a resume takes that).
    assert "shape the state changed since step 4: model.d_model: None -> 48 (" in bad.stderr
    assert "nothing was changed" in bad.stderr and "damaged" not in bad.stderr + bad.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert not (workdir / "corrupt_checkpoints").exists()
    assert (workdir / "config.json").read_text() == config_before
    config = config_lib.load_with_overrides(
        TINY,
        [
            ("data.train_files", corpus["train"]),
            ("data.eval_files", corpus["eval"]),
            ("model.d_state", "48"),
        ],
    )
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="arrays differ"):
        evaluation.evaluate_workdir(config, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    out = run_train(workdir, corpus, "train.steps=6", "checkpoint.every_steps=2", "optim.lr=0.002")
    assert f"resumed from {workdir}/checkpoints/4" in out
    starts = [json.loads(x) for x in open(workdir / "starts.jsonl")]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (4, True)]
    assert starts[1]["packages"]["jax"] == jax.__version__ and starts[1]["devices"] >= 1
    assert "--workdir" in starts[1]["argv"] and starts[1]["lrulm"]
    assert starts[1]["cwd"] == os.getcwd()  # what relative paths in config.json are relative to
    assert "differs from the run's config.json" in out and "train.steps: 4 -> 6" in out
    assert "optim.lr: 0.006 -> 0.002" in out
    assert "eval at step 6: loss " in out  # each evaluation is also a console line
    assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 0.002


def test_resume_with_another_global_batch_goes_on_at_the_same_row(corpus, four_step_run):
    """The data position is rows of the shuffled order consumed: a resume with a bigger
    global batch goes on where the run left off, with nothing to allow."""
    workdir = four_step_run
    out = run_train(
        workdir, corpus, "train.steps=6", "train.global_batch_size=16", "train.eval_steps=2"
    )
    assert f"resumed from {workdir}/checkpoints/4" in out
    assert "eval metrics before and after this step are not comparable" in out
    ckpt = ckpt_lib.Checkpointer(str(workdir))
    try:
        assert ckpt.metadata(4)["data"]["rows"] == 4 * 8
        assert ckpt.metadata(6)["data"]["rows"] == 4 * 8 + 2 * 16
        assert ckpt.metadata(6)["data"]["global_batch"] == 16
        assert ckpt.data_position(6) == {"rows": 64}
    finally:
        ckpt.close()
    files = list((workdir / "checkpoints" / "6" / "data").glob("process_*.json"))
    assert [json.loads(f.read_text()) for f in files] == [{"rows": 64, "global_batch": 16}]


def test_resume_with_other_data_settings_is_refused(tmp_path, corpus, four_step_run, lrulm_here):
    """Another train split (or seq_len, or seed) is another order of the data: a resume
    would not continue the run's order. That is refused before anything changes, unless
    checkpoint.allow_data_change says to go on."""
    workdir = four_step_run
    config_before = (workdir / "config.json").read_text()
    bigger = tmp_path / "bigger.txt"  # the corpus grew: more train sequences
    bigger.write_text(open(corpus["train"]).read() * 2)
    for change, message in [
        ([f"data.train_files={bigger}"], "train_examples "),
        (["train.seed=1"], "seed 0 -> 1"),
    ]:
        bad = lrulm_here(*train_args(workdir, corpus, "train.steps=6", *change))
        assert bad.returncode == 2, bad.stderr[-3000:]
        assert "checkpoint 4 was trained with other data settings (" in bad.stderr
        assert message in bad.stderr and "allow_data_change=true" in bad.stderr
        assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
        assert (workdir / "config.json").read_text() == config_before
    out = run_train(
        workdir, corpus, "train.steps=6", "train.seed=1", "checkpoint.allow_data_change=true",
    )  # fmt: skip
    assert f"resumed from {workdir}/checkpoints/4" in out


def test_checkpoints_that_counted_steps_still_check_the_global_batch(tmp_path):
    """Before positions were rows, a checkpoint's data position was its step: such a
    checkpoint (no "rows") still refuses another global batch, and positions by steps of
    its own batch."""
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    try:
        state = {"step": jnp.zeros((), jnp.int32)}
        old = {"global_batch": 8, "seq_len": 16, "seed": 0, "train_examples": 40}
        ckpt.save(3, state, metadata={"data": old})
        ckpt.save(5, state, metadata={"data": {**old, "rows": 40}})
        assert "global_batch 8 -> 16" in ckpt.data_change(3, {**old, "global_batch": 16})
        assert ckpt.data_change(5, {**old, "global_batch": 16}) == ""
        assert "seed 0 -> 2" in ckpt.data_change(5, {**old, "seed": 2})
        assert ckpt.data_position(3) == {"next_index": 3, "global_batch": 8}
        assert ckpt.data_position(5) == {"rows": 40}
    finally:
        ckpt.close()


def test_restore_onto_other_meshes(tmp_path, corpus):
    def cfg(*mesh):
        pairs = [
            ("data.train_files", corpus["train"]),
            ("data.eval_files", corpus["eval"]),
            ("train.steps", "4"),
            ("train.eval_every", "0"),
            ("checkpoint.every_steps", "4"),
        ]
        return config_lib.load_with_overrides(TINY, pairs + [tuple(m.split("=")) for m in mesh])

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(cfg("mesh.data=8"), workdir)
    results = {}
    for name, mesh_args, devices in [
        ("data8", ["mesh.data=8"], None),
        ("fsdp4_tp2", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"], None),
        ("four_devices", ["mesh.data=4"], jax.devices()[:4]),
    ]:
        config = cfg(*mesh_args)
        mesh = experiment.make_mesh(config, devices)
        exp = experiment.build(config, tasks.make_task(config, workdir), mesh)
        checkpointer = ckpt_lib.Checkpointer(workdir)
        state = checkpointer.restore_latest(exp.abstract_state).state
        checkpointer.close()
        leaf = state["params"]["stack"]["blocks"]["lru"]["B_re"]
        assert leaf.sharding == exp.state_shardings["params"]["stack"]["blocks"]["lru"]["B_re"]
        params = jax.device_get(state["params"])
        train_jit, _ = train.jit_steps(exp)
        rng = np.random.default_rng(1)
        batch = {
            k: jax.device_put(rng.integers(4, 500, shape).astype(np.int32), exp.batch_shardings[k])
            for k, (shape, _) in exp.batch_spec.items()
        }
        _, metrics = train_jit(state, batch)
        results[name] = (params, float(metrics["train/loss"]))
    ref_params, ref_loss = results["data8"]
    for name, (params, loss) in results.items():
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)


def test_plain_orbax_reads_the_parameters(tmp_path, corpus):
    workdir = tmp_path / "run"
    run_train(workdir, corpus, "train.steps=2", "checkpoint.every_steps=2")
    script = (
        "import sys, orbax.checkpoint as ocp\n"
        "tree = ocp.StandardCheckpointer().restore(sys.argv[1])\n"
        "lru = tree['params']['stack']['blocks']['lru']\n"
        "print(sorted(lru), lru['nu_log'].shape, int(tree['step']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(workdir / "checkpoints" / "2" / "state")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "'B_im', 'B_re', 'C_im', 'C_re', 'D', 'gamma_log', 'nu_log', 'theta_log'" in out.stdout
    assert "(2, 32) 2" in out.stdout


def test_nonfinite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, corpus):
    pairs = [
        ("data.train_files", corpus["train"]),
        ("data.eval_files", corpus["eval"]),
        ("train.steps", "30"),
        ("train.eval_every", "0"),
        ("train.log_every", "10"),
        ("checkpoint.every_steps", "1"),
        ("optim.lr", "1e30"),
        ("optim.warmup_fraction", "0.0"),
        ("optim.grad_clip", "0.0"),
    ]
    config = config_lib.load_with_overrides(TINY, pairs)
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteLoss, match="non-finite at step") as info:
        train.train_and_evaluate(config, workdir)
    bad = info.value.step
    steps = ckpt_lib.Checkpointer(workdir).steps()
    assert steps and max(steps) <= bad
    params = saved_params(workdir, max(steps))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_init_from_checks_shapes(tmp_path, corpus, four_step_run, lrulm_here):
    base = four_step_run
    # Fine-tuning on other data: the source run's tokenizer comes along (its embedding rows
    # are that tokenizer's ids), whichever path names the checkpoint.
    held = tmp_path / "held.jsonl"  # its own held-out file (one may not be both)
    held.write_text("".join(open(corpus["train"]).readlines()[:12]))
    other = {"train": corpus["eval"], "eval": str(held)}
    step_dir = base / "checkpoints" / "4"
    out = run_train(tmp_path / "finetune", other, "train.steps=2",
                    f"checkpoint.init_from={step_dir}", "data.vocab_size=400")  # fmt: skip
    assert f"parameters from {step_dir} (step 4)" in out
    assert f"the tokenizer of checkpoint.init_from: {base}/tokenizer.model" in out
    assert "data.vocab_size=400 is not used: the tokenizer taken" in out
    assert (tmp_path / "finetune" / "tokenizer.model").read_bytes() == (
        base / "tokenizer.model"
    ).read_bytes()
    bad = lrulm_here(*train_args(
        tmp_path / "bad", corpus, "train.steps=2", "model.d_model=48",
        f"checkpoint.init_from={base}",
    ))  # fmt: skip
    assert bad.returncode != 0
    assert "do not fit this model" in bad.stderr and "(2, 32, 32)" in bad.stderr


def test_a_resume_into_other_train_data_of_the_same_size_is_refused(tmp_path, corpus):
    """The same files in another order (or edited text) give as many sequences, and the
    saved row position would point into other data: refused by a digest of sampled
    sequences, as another seq_len is; allow_data_change still resumes."""
    docs = open(corpus["train"]).readlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(docs[::2]))
    b.write_text("".join(docs[1::2]))
    run = tmp_path / "run"
    train_here(run, (f"{a},{b}", corpus["eval"]), "train.steps=4", "checkpoint.every_steps=4")
    with pytest.raises(ValueError, match=r"other data settings \(the train data's content"):
        train_here(run, (f"{b},{a}", corpus["eval"]), "train.steps=6")
    assert ckpt_lib.checkpoint_steps(str(run)) == [4]
    train_here(run, (f"{b},{a}", corpus["eval"]), "train.steps=6",
           "checkpoint.allow_data_change=true")  # fmt: skip
    assert ckpt_lib.checkpoint_steps(str(run))[-1] == 6


def test_unreadable_storage_is_not_damage_and_all_damaged_does_not_restart(
    tmp_path, corpus, damage_checkpoint, monkeypatch
):
    """An I/O error (EIO on a network mount, say) moved every good checkpoint aside and
    trained from step 0 again; now it stops and moves nothing. When every checkpoint is
    really damaged they are moved aside and the run stops saying so; the same command
    then starts over."""
    import errno

    run = tmp_path / "run"
    files = (corpus["train"], corpus["eval"])
    train_here(run, files, "train.steps=4", "checkpoint.every_steps=2")
    real = ckpt_lib.Checkpointer._restore

    def unreadable(self, *args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt_lib.Checkpointer, "_restore", unreadable)
    with pytest.raises(ckpt_lib.CheckpointUnavailable, match="is not damage, so nothing"):
        train_here(run, files, "train.steps=6")
    assert ckpt_lib.checkpoint_steps(str(run)) == [2, 4]
    assert not (run / "corrupt_checkpoints").exists()
    monkeypatch.setattr(ckpt_lib.Checkpointer, "_restore", real)
    for step in (2, 4):
        damage_checkpoint(run / "checkpoints" / str(step))
    with pytest.raises(
        ckpt_lib.CheckpointsDamaged,
        match=r"steps 2, 4 damaged, now in .*run the same command again to train from step 0",
    ):
        train_here(run, files, "train.steps=6")
    assert ckpt_lib.checkpoint_steps(str(run)) == []
    train_here(run, files, "train.steps=2", "checkpoint.every_steps=2")  # starts over
    assert ckpt_lib.checkpoint_steps(str(run)) == [2]


@pytest.mark.parametrize("mode, values, best_step", [("max", (0.5, 0.9, 0.7), 20),
                                                      ("min", (0.5, 0.9, 0.3), 30)])  # fmt: skip
def test_best_checkpoint_keeps_the_best_value_and_its_state(tmp_path, mode, values, best_step):
    """Only a better value saves (max: higher; min: lower); the kept state and value are
    the best step's, also after a resume reads them back."""
    best = best_lib.BestCheckpoint(str(tmp_path), "m", mode)
    saved = [best.update(s, {"m": v}, {"w": jnp.full(2, float(s))}) for s, v in
             zip((10, 20, 30), values)]  # fmt: skip
    assert saved == [True, best_step == 20, best_step == 30]
    best.close()
    best = best_lib.BestCheckpoint(str(tmp_path), "m", mode)
    assert best.step == best_step and best.value == values[best_step // 10 - 1]
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=jnp.zeros(2).sharding)}
    restored = best.restore(abstract)
    assert restored.step == best_step
    np.testing.assert_array_equal(restored.state["w"], np.full(2, float(best_step)))
    assert not best.update(40, {"m": values[0]}, {"w": jnp.zeros(2)})  # worse than the best
    best.close()


def test_best_checkpoint_survives_a_step_saved_twice_and_damaged_metadata(tmp_path):
    """A resume from before the best checkpoint's step saves that step again (Orbax
    refused: "already exists", on every rerun); damaged metadata at start moves it aside
    and the next evaluation saves a new best."""
    state = {"w": jnp.arange(4.0)}
    best = best_lib.BestCheckpoint(str(tmp_path), "accuracy", "max")
    assert best.update(25, {"accuracy": 0.5}, state)
    best.close()
    best = best_lib.BestCheckpoint(str(tmp_path), "accuracy", "max")  # resumed at step 20
    best.value = None  # the resumed run's history: its step-25 eval is a new best
    assert best.update(25, {"accuracy": 0.6}, {"w": jnp.ones(4)})
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    np.testing.assert_array_equal(best.restore(abstract).state["w"], np.ones(4))
    best.close()
    (tmp_path / "best" / "checkpoints" / "25" / "metadata" / "metadata").write_text("{oops")
    best = best_lib.BestCheckpoint(str(tmp_path), "accuracy", "max")
    assert best.value is None and best.ckpt.steps() == []
    assert glob.glob(str(tmp_path / "best" / "corrupt_checkpoints" / "25-*"))
    best.close()


def test_eval_scores_a_run_whose_mesh_does_not_fit_these_devices(lm_workdir):
    """A run trained on a larger mesh (here 16-way FSDP) is evaluated data-parallel on
    the devices there are, with the same numbers."""
    with open(os.path.join(lm_workdir, "config.json")) as f:
        config = config_lib.from_dict(json.load(f))
    want = evaluation.evaluate_workdir(config, lm_workdir, 8)
    config.mesh.data, config.mesh.fsdp = 1, 16
    got = evaluation.evaluate_workdir(config, lm_workdir, 8)
    assert got["eval/loss"] == pytest.approx(want["eval/loss"], rel=1e-5)


def test_a_failed_restore_does_not_flood_the_log(monkeypatch):
    """A damaged checkpoint's restore leaves reads in flight that complete into Orbax's
    closed event loop: hundreds of "Event loop is closed" tracebacks. From the first
    restore on, those (and only those) unraisable reports are dropped."""
    import sys
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    ckpt_lib.quiet_orphaned_reads()
    ckpt_lib.quiet_orphaned_reads()  # once is enough: not wrapped twice

    def report(error, source=None):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error, exc_type=type(error),
                                                 object=source))  # fmt: skip

    def coroutine_of(filename):  # a coroutine whose code is in that file, as Orbax's reads
        scope = {}
        exec(compile("async def read(): pass", filename, "exec"), scope)
        return scope["read"]()

    report(RuntimeError("Event loop is closed"))
    report(RuntimeError("something else"))
    report(ValueError("Event loop is closed"))
    orbax_read = coroutine_of(os.path.join("site-packages", "orbax", "serialization.py"))
    other_read = coroutine_of(os.path.join("site-packages", "mine", "io.py"))
    report(Exception("Encountered error while reading array index"), orbax_read)
    report(Exception("my own"), other_read)
    orbax_read.close(), other_read.close()
    assert seen == ["something else", "Event loop is closed", "my own"]


@pytest.mark.parametrize(
    "spec, golden",
    [("configs/lm/tiny.py:test", "state_tree_lm_tiny_test.txt"),
     ("configs/lra/listops.py:tiny", "state_tree_lra_listops_tiny.txt")],
)  # fmt: skip
def test_the_saved_state_tree_is_the_one_earlier_versions_saved(spec, golden):
    """The train state's tree (paths, shapes, dtypes) of a default config is the one
    lrulm saved before (tests/golden, written by the version of 2026-11-26): a new config
    key that changes it at its default would stop every earlier checkpoint restoring.
    Change the golden file only with a way for old checkpoints to restore."""
    config = config_lib.load_with_overrides(spec, [])
    task = tasks.make_task(config, None, prepare_data=False)
    exp = experiment.build(config, task, experiment.make_mesh(config, jax.devices()[:1]))
    lines = [
        f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {x.dtype}"
        for path, x in jax.tree_util.tree_flatten_with_path(exp.abstract_state)[0]
    ]
    with open(os.path.join(os.path.dirname(__file__), "golden", golden)) as f:
        assert lines == f.read().splitlines()


def test_checkpoints_by_time_at_log_steps(tmp_path, corpus):
    """checkpoint.every_minutes: a save at each log step the time has passed by (here all
    of them), besides every_steps and the last step; 0: none by time."""
    ckpts = lambda w: sorted(int(d) for d in os.listdir(w / "checkpoints") if d.isdigit())
    common = ["train.steps=6", "checkpoint.every_steps=1000", "checkpoint.max_to_keep=10"]
    train_here(tmp_path / "timed", (corpus["train"], corpus["eval"]), *common,
           "train.log_every=2", "checkpoint.every_minutes=1e-9")  # fmt: skip
    assert ckpts(tmp_path / "timed") == [2, 4, 6]
    train_here(
        tmp_path / "untimed", (corpus["train"], corpus["eval"]), *common, "train.log_every=2"
    )
    assert ckpts(tmp_path / "untimed") == [6]
    with pytest.raises(ValueError, match=r"checkpoint.every_minutes must be >= 0"):
        train_here(
            tmp_path / "bad", (corpus["train"], corpus["eval"]), "checkpoint.every_minutes=-1"
        )
