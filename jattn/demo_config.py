"""The parts of `jattn demo` and their settings, without JAX: the `jattn` command line builds its
parser from these before JAX starts (so that `jattn --help` answers at once)."""

import dataclasses

# In the order they run.
DEMO_PARTS = ("attention", "gpt", "decode")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    batch: int = 2
    length: int = 512
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    causal: bool = True
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class GPTDemo:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    dim: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    sample_tokens: int = 200
    prompt: str = "def "
    attention_devices: int = 4  # the decode's KV cache is sharded over this many devices
    corpus_bytes: int = 2_000_000
    seed: int = 0
