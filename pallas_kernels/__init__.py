"""Pallas GPU kernels behind `jattn`. Private: import `jattn`, not this package.

The flash attention (Triton and Mosaic GPU), TSSA and decode kernels land here, one file each,
and plug into `jattn`'s implementation registry.
"""
