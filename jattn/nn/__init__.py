"""Flax NNX modules built on jattn's attention operators."""

from jattn.nn.attention import MultiHeadAttention as MultiHeadAttention
from jattn.nn.attention import flax_attention_fn as flax_attention_fn
from jattn.nn.graph import ChannelGraphAttention as ChannelGraphAttention
from jattn.nn.graph import GraphAttention as GraphAttention
from jattn.nn.graph import HardGraphAttention as HardGraphAttention
from jattn.nn.rotary import apply_rotary as apply_rotary
from jattn.nn.tssa import Temperature as Temperature
from jattn.nn.tssa import TokenStatisticsAttention as TokenStatisticsAttention
from jattn.nn.tssa import ToSTBlock as ToSTBlock
from jattn.nn.tssa import weight_decay_mask as weight_decay_mask

__all__ = [
    "ChannelGraphAttention",
    "GraphAttention",
    "HardGraphAttention",
    "MultiHeadAttention",
    "Temperature",
    "ToSTBlock",
    "TokenStatisticsAttention",
    "apply_rotary",
    "flax_attention_fn",
    "weight_decay_mask",
]
