"""Example models built from `jattn.nn`, with jit-compiled optax training scripts.

Run from the repository root: `python -m models.<name> --help`.
"""
