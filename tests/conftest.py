"""Test set-up: 8 simulated CPU devices, so sharding tests see a real mesh; one XLA
compilation cache for the session, shared with the processes the tests start."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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

import pytest  # noqa: E402

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
