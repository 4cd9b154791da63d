"""`python -m lrulm ...` is the `lrulm` console script."""

from lrulm.main import run

run()
