"""The suite's own set-up (conftest.py): XLA's optimisations off and its older CPU fusion
emitters for the many small programs the tests compile, the defaults back for a test
marked `optimize_xla`, for what it compiles in this process and in the processes it
starts."""

import os
import subprocess
import sys

import jax
import pytest
from conftest import OLD_EMITTERS
from run_helpers import xla_flags

_READ = """
import os, jax, jax.numpy as jnp
assert float(jax.jit(lambda x: jnp.exp(x).sum())(jnp.zeros(3))) == 3.0  # the flags parse
print(jax.config.read('jax_disable_most_optimizations'), os.environ['XLA_FLAGS'])
"""


def _flags_in_a_new_process(env=None) -> str:
    return subprocess.run(
        [sys.executable, "-c", _READ], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()


def test_most_optimisations_are_off_here_and_in_started_processes():
    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") != "1":
        pytest.skip("JAX_DISABLE_MOST_OPTIMIZATIONS set otherwise for this session")
    assert jax.config.read("jax_disable_most_optimizations") is True
    assert _flags_in_a_new_process().split()[0] == "True"


def test_started_processes_get_the_older_emitters_with_their_own_device_count():
    if OLD_EMITTERS not in os.environ["XLA_FLAGS"].split():
        pytest.skip("XLA_FLAGS set otherwise for this session")
    flags = xla_flags(2).split()
    assert flags[0] == "--xla_force_host_platform_device_count=2" and OLD_EMITTERS in flags
    assert _flags_in_a_new_process(dict(os.environ, XLA_FLAGS=" ".join(flags))).split()[1:] == flags


@pytest.mark.optimize_xla
def test_a_marked_test_compiles_with_xla_optimisations():
    assert jax.config.read("jax_disable_most_optimizations") is False
    printed = _flags_in_a_new_process().split()
    assert printed[0] == "False" and OLD_EMITTERS not in printed
