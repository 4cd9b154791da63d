"""Pallas kernels of the linear recurrence (GPU Triton, TPU Mosaic); lrulm.scan_pallas
chooses, shards and differentiates them."""
