"""Test set-up: 8 simulated CPU devices, so sharding tests see a real mesh; one XLA
compilation cache for the session, shared with the processes the tests start."""

import atexit
import gc
import glob
import os
import shutil
import tempfile

# XLA's older elemental emitters for CPU fusions, not its MLIR fusion emitters: with most
# optimisations off (below) they compile a test's programs ~40% faster (the tiny LM's train
# step 2.9 -> 1.6 s), to the same numbers. At -O2 they gain nothing (`optimize_xla` drops it).
OLD_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {OLD_EMITTERS}")
# Most of XLA's optimisations off (its -O0, LLVM's expensive passes too): the tests compile
# hundreds of small programs and run each briefly, and LLVM's passes were most of their
# time (the suite ~15% faster on 2 cores). The processes the tests start inherit it. A test
# whose time is in running what it compiled (real training) is marked `optimize_xla`.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Dozens of `lrulm train` processes compile the same small programs: each compiles once a
# session (checkpoint tests ~25% faster). Fresh each session, removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="lrulm-tests-xla-cache-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import json  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

# jax's CUDA plugin (0.10.2) compiles each Mosaic GPU kernel through a scratch folder
# /tmp/mosaic-gpu-XXXXXX (ptxas's kernel.bin, read back at once) that it never removes:
# the GPU-compile tests leave ~16 a session. Those made during the session by this user,
# holding the finished kernel.bin alone, are removed at its end, by the process that ran
# the session (with pytest-xdist, the controller, once every worker is done).
_MOSAIC_SCRATCH = "/tmp/mosaic-gpu-*"


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):
        session.config._mosaic_scratch_before = set(glob.glob(_MOSAIC_SCRATCH))


def pytest_sessionfinish(session):
    before = getattr(session.config, "_mosaic_scratch_before", None)
    if before is None:  # an xdist worker (which reports itself finished after this hook)
        # After it reports itself finished, a worker's last work is pytest's cleanup: five
        # full garbage collections over all its tests left (jax's caches, millions of
        # objects: ~1-2 s each). execnet sends SIGINT to a worker still busy 5 s after the
        # controller ends the session, which showed as a KeyboardInterrupt in jax's gc
        # callback after the last test. One collection now, and the survivors frozen:
        # those five have nothing left to walk.
        gc.collect()
        gc.freeze()
        return
    for path in set(glob.glob(_MOSAIC_SCRATCH)) - before:
        try:
            if os.stat(path).st_uid == os.getuid() and os.listdir(path) == ["kernel.bin"]:
                shutil.rmtree(path)
        except OSError:
            pass  # gone already, or not ours to read


@pytest.fixture(autouse=True)
def _optimize_xla(request, monkeypatch):
    """XLA's optimisations back on for a test marked `optimize_xla`, in this process
    (jax reads the flag at each compile) and the processes it starts (which also get XLA's
    default fusion emitters)."""
    if request.node.get_closest_marker("optimize_xla") is None:
        yield
        return
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    flags = os.environ.get("XLA_FLAGS", "").split()  # fixed here; for started processes:
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in flags if f != OLD_EMITTERS))
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


TINY = "configs/lm/tiny.py:test"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small real corpus (40 standard-library files as JSON lines) so runs stay fast."""
    from lrulm.data import lm as lm_data

    train_files, eval_files = lm_data.default_corpus()
    d = tmp_path_factory.mktemp("corpus")
    for name, files in (("train", train_files[:40]), ("eval", eval_files[:4])):
        with open(d / f"{name}.jsonl", "w") as f:
            for path in files:
                text = open(path, encoding="utf-8", errors="replace").read()
                f.write(json.dumps({"text": text}) + "\n")
    return {"train": str(d / "train.jsonl"), "eval": str(d / "eval.jsonl")}


@pytest.fixture
def gpu_tuning(request):
    """Sets lrulm.kernels.gpu's launch shape (text, as $LRULM_PALLAS_GPU_TUNING) for one
    test; yields the parsed Tuning. The kernels read it while tracing, so every cached
    trace is dropped before and after."""
    from lrulm import scan_pallas
    from lrulm.kernels import gpu as gpu_kernels

    old = os.environ.get(gpu_kernels.TUNING_ENV)
    os.environ[gpu_kernels.TUNING_ENV] = request.param
    scan_pallas.forget_traces()
    yield gpu_kernels.tuning()
    if old is None:
        os.environ.pop(gpu_kernels.TUNING_ENV)
    else:
        os.environ[gpu_kernels.TUNING_ENV] = old
    scan_pallas.forget_traces()


@pytest.fixture
def mosaic_calls(monkeypatch):
    """Counts the Mosaic GPU kernels traced, so that a test knows they ran (the dispatch
    falls back to Triton for operands they do not support)."""
    from lrulm.kernels import mosaic_gpu as mosaic_kernels

    calls = []
    for name in ("forward", "backward"):
        original = getattr(mosaic_kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(mosaic_kernels, name, spy)
    return calls


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_process(capsys, call, args) -> subprocess.CompletedProcess:
    """call() under capsys, as `subprocess.run(args)` would report it: SystemExit's code
    (argparse's errors, --help, a script's sys.exit), sys.exit(text) as status 1 with the
    text on stderr, as Python does; a return or None is 0."""
    capsys.readouterr()
    try:
        code = call()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    err = out.err
    if isinstance(code, str):
        code, err = 1, err + code + "\n"
    return subprocess.CompletedProcess(list(args), code or 0, out.out, err)


@pytest.fixture
def lrulm_here(capsys, monkeypatch):
    """`lrulm ARGS` in this process (lrulm.main.main, as `python -m lrulm` runs it, without
    a process's ~3 s of imports): a function of the arguments returning a
    subprocess.CompletedProcess, as `subprocess.run` would. For the commands that stop at
    an error, or print a result."""
    from lrulm import main
    from lrulm import metrics as metrics_lib

    monkeypatch.chdir(_ROOT)

    def run(*args):
        try:
            return _in_process(capsys, lambda: main.main(list(args)), args)
        finally:  # eval, generate, score and config send messages to stderr from then on
            metrics_lib.messages_to_stderr(False)

    return run


@pytest.fixture
def tool_here(capsys, monkeypatch):
    """`python tools/NAME.py ARGS` in this process (runpy, as __main__), without the ~3 s
    a process takes to import jax: a function of the tool's path (from the repository's
    root) and its arguments, returning what lrulm_here does. For arguments a tool refuses
    before any work; environment variables a tool sets at import are put back."""
    import runpy
    import sys

    monkeypatch.chdir(_ROOT)
    monkeypatch.syspath_prepend(os.path.join(_ROOT, "tools"))

    def run(tool, *args):
        environ = dict(os.environ)
        monkeypatch.setattr(sys, "argv", [tool, *args])

        def call():  # returns None: a script that runs to its end exits 0
            runpy.run_path(os.path.join(_ROOT, tool), run_name="__main__")

        try:
            return _in_process(capsys, call, [tool, *args])
        finally:
            os.environ.clear()
            os.environ.update(environ)

    return run


@pytest.fixture(scope="session")
def lm_workdir(tmp_path_factory, corpus):
    """A real run of configs/lm/tiny.py:test with checkpoints at steps 4 and 8."""
    from lrulm import config as config_lib
    from lrulm import train

    workdir = str(tmp_path_factory.mktemp("run"))
    overrides = dict(
        data__train_files=corpus["train"],
        data__eval_files=corpus["eval"],
        train__steps="8",
        train__eval_every="8",
        checkpoint__every_steps="4",
        checkpoint__async_save="false",
    )
    config = config_lib.load_with_overrides(
        "configs/lm/tiny.py:test", [(k.replace("__", "."), v) for k, v in overrides.items()]
    )
    train.train_and_evaluate(config, workdir)
    return workdir


def _damage_checkpoint(step_dir) -> None:
    """Truncates every array-data file of a checkpoint, as a crash of the storage might
    (every one, so the damage cannot land only on bytes a restore never reads)."""
    data = [
        f
        for f in glob.glob(os.path.join(str(step_dir), "state", "**", "*"), recursive=True)
        if os.path.isfile(f) and os.path.basename(os.path.dirname(f)) == "d"
    ]
    assert data, "no array data found: the checkpoint layout changed"
    for path in data:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)


@pytest.fixture
def damage_checkpoint():
    """A function that damages the checkpoint in the directory it is given."""
    return _damage_checkpoint
