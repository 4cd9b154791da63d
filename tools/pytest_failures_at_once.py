"""A pytest plugin that prints each failure as it happens, one line per failed test:

    FAILED tests/test_x.py::test_y (call) - E   AssertionError: ...

pytest (and pytest-xdist) print failures only when the session ends, so a run killed at
its time limit (a lent GPU's 10-minute call: tools/gpu_check.sh) would say that tests
failed but not why. Load it with `-p pytest_failures_at_once` and tools/ on PYTHONPATH."""

import sys

_MAX_CHARS = 400
_printing = True  # False in a pytest-xdist worker: its controller prints every report


def pytest_configure(config):
    global _printing
    _printing = not hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    if not (report.failed and _printing):
        return
    lines = report.longreprtext.strip().splitlines()
    errors = [" ".join(line.split()) for line in lines if line.startswith("E ")][:3]
    why = " | ".join(errors) or (lines[-1].strip() if lines else "")
    sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when}) - {why[:_MAX_CHARS]}\n")
    sys.stderr.flush()
