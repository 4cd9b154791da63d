"""The README's main job, shortened, through the real command line; and CLI errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from run_helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lrulm(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "lrulm", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.optimize_xla
def test_embedded_default_learns_then_generates(tmp_path):
    """configs/lm/tiny.py on the standard library's source, shortened: 80 of its 400 steps
    (eval loss ~4.1 nats against a unigram entropy of ~6.0; 3.4 after 150, 2.6 after 400)."""
    workdir = str(tmp_path / "tiny")
    out = _lrulm(
        "train",
        "--config",
        "configs/lm/tiny.py",
        "--workdir",
        workdir,
        "--config.train.steps=80",
        "--config.train.eval_every=80",
        "--config.checkpoint.every_steps=80",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    entropy = rows[0]["data/unigram_entropy"]
    eval_loss = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    print(f"\nunigram entropy {entropy:.2f} nats, eval loss after 80 steps {eval_loss:.2f}")
    assert eval_loss < entropy - 1.0
    for name in ("config.json", "tokenizer.model", "tensorboard", "checkpoints/80"):
        assert os.path.exists(os.path.join(workdir, name)), name
    gen = _lrulm(
        "generate",
        "--workdir",
        workdir,
        "--prompt",
        "def __init__(self",
        "--max_new_tokens",
        "40",
        "--seed",
        "1",
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("def __init__(self") and len(gen.stdout) > 40
    ev = _lrulm("eval", "--config", "configs/lm/tiny.py", "--workdir", workdir)
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["step"] == 80 and abs(result["eval/loss"] - eval_loss) < 1e-4


def test_cli_errors_are_clear(tmp_path, lrulm_here):
    out = lrulm_here(
        "train",
        "--config",
        "configs/lm/tiny.py",
        "--workdir",
        str(tmp_path),
        "--config.train.stpes=3",
    )
    assert out.returncode == 2 and "unknown config key 'train.stpes'" in out.stderr
    assert "Traceback" not in out.stderr
    out = lrulm_here("train", "--config", "configs/lm/nope.py", "--workdir", str(tmp_path))
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = lrulm_here("generate", "--workdir", str(tmp_path / "none"), "--prompt", "x")
    assert out.returncode == 2 and "not a training workdir" in out.stderr
    out = lrulm_here("generate", "--workdir", str(tmp_path), "--prompt", "x", "--top_p", "1.5")
    assert out.returncode == 2 and "top_p must be in (0, 1]" in out.stderr
    for command in ("train", "eval", "compile"):
        out = lrulm_here(command, "--help")
        assert out.returncode == 0 and "--config.KEY=VALUE" in out.stdout, command


def test_a_diverging_run_ends_with_one_line_and_exit_1(tmp_path, corpus):
    """The non-finite-loss stop is a failed run, not bad input (2) or a crash: one line
    saying what to do, exit 1, no traceback."""
    out = _lrulm(
        "train", "--config", "configs/lm/tiny.py:test", "--workdir", str(tmp_path / "run"),
        f"--config.data.train_files={corpus['train']}",
        f"--config.data.eval_files={corpus['eval']}",
        "--config.optim.lr=1e30", "--config.optim.warmup_fraction=0", "--config.train.steps=5",
        "--config.train.log_every=1",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "became non-finite at step" in out.stderr and "Lower optim.lr" in out.stderr
    assert "Traceback" not in out.stderr


def test_eval_step_flag(lm_workdir, corpus, lrulm_here):
    data = [f"--config.data.train_files={corpus['train']}"]
    data += [f"--config.data.eval_files={corpus['eval']}"]
    out = lrulm_here(
        "eval", "--config", "configs/lm/tiny.py:test", "--workdir", lm_workdir, "--step", "4", *data
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 4
    out = lrulm_here(
        "eval", "--config", "configs/lm/tiny.py:test", "--workdir", lm_workdir, "--step", "5", *data
    )
    assert out.returncode == 2 and "no checkpoint of step 5" in out.stderr
    out = lrulm_here("eval", "--workdir", lm_workdir, "--best")
    assert out.returncode == 2 and "language models with checkpoint.keep_best set" in out.stderr
    out = lrulm_here("eval", "--workdir", lm_workdir, "--best", "--step", "4")  # keeps one: either
    assert out.returncode == 2 and "not allowed with argument" in out.stderr
    # Without --config: the run's own config.json (its data files included).
    out = lrulm_here("eval", "--workdir", lm_workdir, "--config.train.eval_steps=1")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 8 and result["eval/tokens"] == 8 * 64


def test_eval_prints_only_its_result_and_names_damaged_checkpoints(
    lm_workdir, tmp_path, damage_checkpoint, lrulm_here
):
    """stdout is the JSON result alone (messages go to stderr), so `> result.json` and
    `| jq` work; damaged checkpoints get one line each and an exit code of 2."""
    workdir = tmp_path / "run"
    shutil.copytree(lm_workdir, workdir)
    damage_checkpoint(workdir / "checkpoints" / "8")
    out = _lrulm("eval", "--workdir", str(workdir), "--config.train.eval_steps=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["step"] == 4  # the newest that reads back
    assert f"checkpoint {workdir}/checkpoints/8 is damaged (" in out.stderr
    out = _lrulm("eval", "--workdir", str(workdir), "--step", "8")
    # No traceback of lrulm's (TensorStore may print "Event loop is closed" ones from its
    # own threads, for the reads still in flight when the first one failed).
    assert out.returncode == 2 and "/lrulm/" not in out.stderr, out.stderr[-2000:]
    # TensorStore's threads may write into the same line: find the message, not a line.
    at = out.stderr.find("lrulm eval: error: ")
    assert at >= 0, out.stderr[-2000:]
    message = out.stderr[at:].splitlines()[0]
    assert f"checkpoint {workdir}/checkpoints/8 does not read back (" in message
    assert 0 < message.find("it is damaged; give another --step (4)") < 600  # one short line
    damage_checkpoint(workdir / "checkpoints" / "4")
    out = _lrulm("eval", "--workdir", str(workdir))
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    assert "reads back (steps 4, 8): all are damaged" in out.stderr
    # A mistyped workdir: an error, and nothing created there.
    typo = tmp_path / "rnu"
    out = lrulm_here("eval", "--config", "configs/lm/tiny.py:test", "--workdir", str(typo))
    assert out.returncode == 2 and "no checkpoint in" in out.stderr and not typo.exists()
    out = lrulm_here("eval", "--workdir", str(typo))
    assert out.returncode == 2 and f"workdir {typo} does not exist" in out.stderr


def test_config_command_prints_the_config_and_its_model(lrulm_here):
    """`lrulm config`: the config with its overrides, and the model it resolves to (what
    model.json will hold), as JSON on stdout; no data is read."""
    from lrulm.model_config import from_preset

    out = lrulm_here("config", "--config", "configs/lm/base.py:size=350m", "--config.optim.lr=1e-4")
    assert out.returncode == 0, out.stderr[-2000:]
    printed = json.loads(out.stdout)
    assert printed["config"]["optim"]["lr"] == 1e-4
    preset = from_preset("350m")
    assert printed["model"]["d_model"] == preset.d_model
    assert printed["model"]["num_params"] == preset.num_params() == 394_566_656
    bad = lrulm_here("config", "--config", "configs/lm/tiny.py", "--config.optim.lrr=1")
    assert bad.returncode == 2 and "did you mean 'optim.lr'" in bad.stderr
    # The values train would refuse (but for the devices), refused here too: a sweep's
    # configs can be vetted before they are launched.
    bad = lrulm_here("config", "--config", "configs/lm/tiny.py", "--config.optim.ema=1.5")
    assert bad.returncode == 2 and "optim.ema must be in [0, 1)" in bad.stderr
    from lrulm import experiment

    for override, message in [
        ("train.steps=-3", "train.steps must be positive"),
        ("optim.schedule=cosin", "optim.schedule must be one of cosine"),
        ("train.global_batch_size=0", "train.global_batch_size must be positive"),
        ("optim.grad_accum_steps=0", "optim.grad_accum_steps must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            experiment.check_config(tiny_config(override))


def test_a_reader_that_stops_early_gets_no_traceback():
    """`lrulm config ... | head -1`: the closed pipe ends the command with 141 (as SIGPIPE
    ends other tools), not a BrokenPipeError traceback on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrulm", "config", "--config", "configs/lm/tiny.py"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader is gone before anything is written
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "BrokenPipeError" not in stderr, stderr


def test_output_paths_are_checked_before_the_work(tmp_path, lrulm_here, tool_here):
    """Every tool writing a report refuses an unwritable path at once (exit 2, one line),
    not in a traceback after its minutes of work."""
    bad = str(tmp_path / "missing" / "x.json")
    commands = [
        ["tools/bench.py", "--quick", "--json", bad],
        ["tools/bench_train.py", "--preset", "test", "--steps", "1", "--json", bad],
        ["tools/gpu_kernel_sweep.py", "--json", bad],
        ["tools/gpu_sass.py", "--json", bad],
        ["tools/lru_layer_aot.py", "--json", bad],
        ["tools/tpu_kernel_schedule.py", "--json", bad],
        ["tools/tpu_fit_table.py", "--out", str(tmp_path / "a_file" / "fit.md")],
    ]  # fmt: skip
    (tmp_path / "a_file").write_text("")  # tpu_fit_table.py makes a missing folder
    outs = [tool_here(*args) for args in commands]
    outs.append(lrulm_here("compile", "--config", "configs/lm/tiny.py", "--topology", "v5e-4",
                           "--json", bad))  # fmt: skip
    for out in outs:
        assert out.returncode == 2, (out.args, out.stderr[-1500:])
        said = ("existing, writable directory", "its folder cannot be made")
        assert any(x in out.stderr for x in said) and "Traceback" not in out.stderr


def test_odd_workdirs_configs_and_commands_get_one_line(tmp_path, lm_workdir, lrulm_here):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = lrulm_here("train", "--config", "configs/lm/tiny.py", "--workdir", str(afile))
    assert out.returncode == 2 and "is a file; give a directory" in out.stderr
    out = lrulm_here("eval", "--workdir", str(afile))
    assert out.returncode == 2 and "is a file, not a run's directory" in out.stderr
    out = lrulm_here("config", "--config", "configs/lm")
    assert out.returncode == 2 and "is a directory; give a config file in it" in out.stderr
    out = lrulm_here("config", "--config", str(afile))
    assert out.returncode == 2 and "give a Python config file" in out.stderr
    # A run's config.json is a config: `lrulm config` shows it, with overrides.
    out = lrulm_here("config", "--config", os.path.join(lm_workdir, "config.json"),
                 "--config.train.steps=3")  # fmt: skip
    assert out.returncode == 0, out.stderr[-1500:]
    shown = json.loads(out.stdout)["config"]
    recorded = json.load(open(os.path.join(lm_workdir, "config.json")))
    assert shown["train"]["steps"] == 3 and shown["data"] == recorded["data"]
    launch = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes", "2", "--", "no_such_command_x"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert launch.returncode == 2 and "'no_such_command_x' is no command here" in launch.stderr


def test_score_takes_the_files_a_shell_glob_expands_to(lm_workdir, tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"def {name[0]}(x):\n    return x\n")
    out = _lrulm("score", "--workdir", lm_workdir, "--input", str(tmp_path / "a.txt"),
                 str(tmp_path / "b.txt"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-1500:]
    assert [json.loads(line)["source"] for line in out.stdout.splitlines()] == [
        f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'b.txt'}:1",
    ]  # fmt: skip


def test_a_commands_errors_show_its_own_usage(lrulm_here, lm_workdir):
    """A mistake in `lrulm generate` (or score, tokenizer train) shows generate's usage and
    flags, not the list of commands."""
    for argv, where in [
        (["generate", "--workdir", lm_workdir, "--prompt", "a", "--max_tokens", "3"], "generate"),
        (["generate", "--workdir", lm_workdir, "--prompt", "a", "--prompt", "b", "--stream"],
         "generate"),
        (["score", "--workdir", lm_workdir], "score"),
        (["tokenizer", "train", "--input", "x", "--output", "y", "--bogus"], "tokenizer train"),
    ]:  # fmt: skip
        out = lrulm_here(*argv)
        assert out.returncode == 2 and f"lrulm {where}: error: " in out.stderr, out.stderr
        assert f"usage: lrulm {where} " in out.stderr and "{train,eval" not in out.stderr
