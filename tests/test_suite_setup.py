"""The suite's own set-up (conftest.py): XLA's optimisations off for the many small
programs the tests compile, back on for a test marked `optimize_xla`, for what it
compiles in this process and in the processes it starts."""

import os
import subprocess
import sys

import jax
import pytest

_READ = "import jax; print(jax.config.read('jax_disable_most_optimizations'))"


def _flag_in_a_new_process() -> str:
    return subprocess.run(
        [sys.executable, "-c", _READ], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_most_optimisations_are_off_here_and_in_started_processes():
    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") != "1":
        pytest.skip("JAX_DISABLE_MOST_OPTIMIZATIONS set otherwise for this session")
    assert jax.config.read("jax_disable_most_optimizations") is True
    assert _flag_in_a_new_process() == "True"


@pytest.mark.optimize_xla
def test_a_marked_test_compiles_with_xla_optimisations():
    assert jax.config.read("jax_disable_most_optimizations") is False
    assert _flag_in_a_new_process() == "False"
