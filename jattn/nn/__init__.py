"""Flax NNX modules built on jattn's attention operators."""

from jattn.nn.attention import MultiHeadAttention as MultiHeadAttention
from jattn.nn.attention import flax_attention_fn as flax_attention_fn
from jattn.nn.rotary import apply_rotary as apply_rotary

__all__ = ["MultiHeadAttention", "apply_rotary", "flax_attention_fn"]
