"""lrulm: deep Linear Recurrent Unit models in JAX, from a laptop to TPU pods."""

__version__ = "0.1.0"
