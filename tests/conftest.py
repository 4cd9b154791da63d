"""Test set-up: 8 simulated CPU devices, so sharding tests see a real mesh."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
