"""Small example models that `jattn demo` runs, shipped with the library so the demo works from an
installed package: a GPT on `jattn.nn.MultiHeadAttention` (`gpt`), a byte-level text corpus
from the Python standard library's sources (`text`) and a minimal optax training loop (`train`).

The training scripts of the repository (`python -m models.train_gpt`, ...) build on these and add
checkpoints, resuming and metrics files.
"""
