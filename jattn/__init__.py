"""jattn: attention for JAX.

Flash attention (Pallas kernels, with XLA and cuDNN paths behind one dispatcher), Token
Statistics Self-Attention, decode attention, and Flax NNX modules. Import from `jattn` only.
"""

import os as _os
import sys as _sys


def _command_line_process() -> bool:
    """True in the `jattn` command's own process (the console script, `python -m jattn.cli`):
    there the library loads on first use, after the arguments are parsed, so that `jattn --help`
    answers without starting JAX. Everywhere else `import jattn` loads everything at once."""
    argv = getattr(_sys, "orig_argv", [])
    script = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    as_module = any(a == "-m" and b == "jattn.cli" for a, b in zip(argv, argv[1:], strict=False))
    return script in ("jattn", "jattn.exe") or as_module


# On the `__getattr__` reload below, `_LOADED` is already True: the module then loads in full.
_LOADED = globals().get("_LOADED", False) or not _command_line_process()
if _LOADED:
    from jattn import autotune as autotune
    from jattn import cudnn as _cudnn  # noqa: F401  (registers implementation="cudnn")
    from jattn import graph as graph
    from jattn import mosaic as _mosaic  # noqa: F401  (registers implementation="mosaic")
    from jattn import nn as nn
    from jattn import offload as offload
    from jattn import parallel as parallel
    from jattn import reference as reference
    from jattn import triton as _triton  # noqa: F401  (registers implementation="triton")
    from jattn.attention import AttentionArgs as AttentionArgs
    from jattn.attention import auto_order as auto_order
    from jattn.attention import available_implementations as available_implementations
    from jattn.attention import dot_product_attention as dot_product_attention
    from jattn.attention import register_implementation as register_implementation
    from jattn.chunked import ChunkedConfig as ChunkedConfig
    from jattn.decode import decode_attention as decode_attention
    from jattn.flex import BlockMask as BlockMask
    from jattn.flex import create_block_mask as create_block_mask
    from jattn.flex import flex_attention as flex_attention
    from jattn.mosaic import MosaicConfig as MosaicConfig
    from jattn.triton import TritonConfig as TritonConfig
    from jattn.tssa import token_statistics_attention as token_statistics_attention
else:

    def __getattr__(name: str):
        """The command-line process's first use of the library: load it all (see above)."""
        global _LOADED
        if _LOADED:
            raise AttributeError(f"module 'jattn' has no attribute {name!r}")
        _LOADED = True
        import importlib

        module = importlib.reload(_sys.modules[__name__])
        return getattr(module, name)


__version__ = "0.1.0"

__all__ = [
    "AttentionArgs",
    "BlockMask",
    "ChunkedConfig",
    "MosaicConfig",
    "TritonConfig",
    "auto_order",
    "autotune",
    "available_implementations",
    "create_block_mask",
    "decode_attention",
    "dot_product_attention",
    "flex_attention",
    "graph",
    "nn",
    "offload",
    "parallel",
    "reference",
    "register_implementation",
    "token_statistics_attention",
]
