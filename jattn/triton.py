"""`implementation="triton"`: jattn's flash attention kernel on Pallas' Triton backend.

Runs compiled on any CUDA GPU and in Pallas interpret mode elsewhere (slow: that is how CPU
tests exercise it; `implementation=None` never picks it off a GPU). Serves the whole contract in
float16, bfloat16 and float32; declines float64 and head dims above 256.
"""

from jax import Array

from jattn.attention import AttentionArgs, option_kwargs, register_implementation
from pallas_kernels import flash_triton
from pallas_kernels.flash_triton import TritonConfig

__all__ = ["TritonConfig"]


def _triton(args: AttentionArgs, config) -> tuple[Array, Array]:
    if config is not None and not isinstance(config, TritonConfig):
        raise NotImplementedError(f"triton needs a TritonConfig, got {type(config).__name__}")
    return flash_triton.flash_attention(
        args.query, args.key, args.value, args.bias, args.mask, config=config, **option_kwargs(args)
    )


register_implementation("triton", _triton)
