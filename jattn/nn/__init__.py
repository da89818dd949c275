"""Flax NNX modules built on jattn's attention operators."""

from jattn.nn.attention import MultiHeadAttention as MultiHeadAttention

__all__ = ["MultiHeadAttention"]
