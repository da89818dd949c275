"""`jattn.offload`: decode with the KV cache and attention on their own devices (after Lamina).

- `sharded_decode_attention`: decode attention with the cache cut over a mesh axis, by kv heads
  or by sequence slots (log-sum-exp merge across devices); equal to `jattn.decode_attention`.
  `striped` / `in_token_order`: a cache's tokens dealt round the devices (token p on device
  p mod n), the order a `KVCache` sharded by sequence keeps, and back.
- `KVCache`, `append`, `advance`, `append_and_attend`: a per-layer cache pytree sharded with
  `NamedSharding` over the attention mesh, written in place (donated) one token at a time.
- `OffloadedDecoder`, `GPTConfig`: a small GPT whose weights and MLP stay on a compute mesh while
  attention runs on the attention mesh; counts the bytes that cross (`link_bytes_formula`);
  `prefill` hands a prompt's KV cache over in one transfer.
- `OverlappedDecoder`: Lamina's staggered pipelining over micro-batches (compute and attention
  devices busy at once).
- `DataParallelDecoder`: the usual alternative, the whole model on every device, each with its
  share of the batch and its own cache.
"""

from jattn.offload.model import DataParallelDecoder as DataParallelDecoder
from jattn.offload.model import GPTConfig as GPTConfig
from jattn.offload.model import OffloadedDecoder as OffloadedDecoder
from jattn.offload.model import OverlappedDecoder as OverlappedDecoder
from jattn.offload.model import compute_devices_for_batch as compute_devices_for_batch
from jattn.offload.model import forward as forward
from jattn.offload.model import init_params as init_params
from jattn.offload.model import link_bytes_formula as link_bytes_formula
from jattn.offload.model import split_devices as split_devices
from jattn.offload.sharded import KVCache as KVCache
from jattn.offload.sharded import advance as advance
from jattn.offload.sharded import append as append
from jattn.offload.sharded import append_and_attend as append_and_attend
from jattn.offload.sharded import cache_spec as cache_spec
from jattn.offload.sharded import in_token_order as in_token_order
from jattn.offload.sharded import make_mesh as make_mesh
from jattn.offload.sharded import merge_over_axis as merge_over_axis
from jattn.offload.sharded import sharded_decode_attention as sharded_decode_attention
from jattn.offload.sharded import striped as striped

__all__ = [
    "DataParallelDecoder",
    "GPTConfig",
    "KVCache",
    "OffloadedDecoder",
    "OverlappedDecoder",
    "advance",
    "append",
    "append_and_attend",
    "cache_spec",
    "compute_devices_for_batch",
    "forward",
    "in_token_order",
    "init_params",
    "link_bytes_formula",
    "make_mesh",
    "merge_over_axis",
    "sharded_decode_attention",
    "split_devices",
    "striped",
]
