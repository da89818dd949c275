"""A decoder-only transformer (GPT) on `jattn.nn.MultiHeadAttention`: the model and its
sampler are `jattn.examples.gpt` (which `jattn demo` trains too), re-exported here.

Pre-LayerNorm blocks, rotary positions, GQA, a GELU MLP, tied input/output embeddings. Training
runs flash attention through `jattn.dot_product_attention` (the Pallas kernels on a GPU, the
chunked XLA path elsewhere); generation prefills the KV cache with it and decodes with
`jattn.decode_attention` (or an offloaded decode, through `decode_fn`).

    python -m models.train_gpt --help
"""

from jattn.examples.gpt import GPT as GPT
from jattn.examples.gpt import MLP as MLP
from jattn.examples.gpt import Block as Block
from jattn.examples.gpt import GPTConfig as GPTConfig
from jattn.examples.gpt import generate as generate
from jattn.examples.gpt import next_token_loss as next_token_loss
