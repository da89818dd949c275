"""Flash attention forward for Hopper (sm_90) on Pallas' Mosaic GPU backend (`plgpu`).

One program per (query head, 2 * block_q query rows, batch) runs three warpgroups:
- a producer (warpgroup 2) streams K and V tiles (and bias/mask tiles, key segment ids) with TMA
  into a `num_stages`-deep ring of shared-memory slots, each guarded by a "produced" barrier
  that the copy completes and a "consumed" barrier the consumers arrive on;
- two consumers (warpgroups 0 and 1) each own block_q query rows: wgmma for S = Q K^T into
  registers, an online softmax in base 2, wgmma for P V, then O and the lse go back by TMA.

Schedule options (`MosaicConfig`; measured on the H200 in benchmarks/NOTES.md): the wait for the
next K tile runs under P V (`early_k_wait`) and causal query tiles go longest first
(`longest_first`), both on by default; a persistent grid of one program per SM that loads the
next tile's Q under this tile's output store (`persistent`), the turns on a hardware named
barrier (`named_barrier`) and FlashAttention-3's intra-warpgroup overlap of the softmax with
the next Q K^T (`softmax_overlap`) are options for the tuner.

Every option of the `dot_product_attention` contract is applied per tile with the mask code the
Triton kernel uses (`common.tile_visibility`): causal with q_offset, window, query/key lengths,
segment ids, soft cap, additive bias, a boolean mask, GQA (head n reads kv head n // G). Key
tiles that causal/window/length masks hide from all 2 * block_q rows are never loaded; tiles
every row sees in full skip the mask arithmetic. Fully masked rows give 0 and lse -inf.

The backward (`flash_mosaic_bwd`) is a dq kernel and a dk/dv kernel on the same plan (above
H = 128, with `bwd_head_split`, the dk/dv kernel's consumers split dK and dV by columns). When
the bias is differentiated (dbias), or the backward's buffers do not fit shared memory or its
accumulators registers, the Triton kernels' backward runs instead, fed with this forward's
output and lse.

Interpret mode: Mosaic GPU's interpreter (JAX >= 0.10) runs this kernel on CPU for tests: the
TMA copies, barriers and the producer/consumer schedule as on the GPU. It lacks layout casts,
`plgpu.load`, `pl.run_state` and transposed wgmma operands, so small helpers of `mosaic_common`
(`layout_cast`, `load_vector`, `mma_*`) swap in plain jnp equivalents there (the matmuls become
jnp dots). `tests/test_flash_mosaic.py` also lowers the GPU path to Mosaic GPU IR on CPU.

Limits: float16 and bfloat16 only (float32 raises NotImplementedError: the dispatcher then
routes it to the Triton kernel); H is padded to a multiple of 64, T to 2 * block_q and S to
block_kv (copies only when needed).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common, flash_mosaic_bwd, flash_triton, mosaic_common
from pallas_kernels.mosaic_common import (
    CONSUMERS,
    NONFINITE,
    THREADS_PER_WARPGROUP,
    TURN_BARRIER,
    WGMMA,
    WGMMA_COL,
    WGMMA_ROW,
    Static,
    bias_dtype,
    clean_landed_tile,
    clean_tile,
    cleaned_steps,
    flag_nonfinite,
    flex_forward_logits,
    flex_indices,
    flex_vectors,
    flex_visible,
    folded_scale,
    hide_invisible,
    hides_keys,
    idiv,
    interpret_kwargs,
    irem,
    key_blocks,
    layout_cast,
    load_vector,
    mma_accumulate,
    mma_transposed,
    named_barrier_sync,
    nonfinite_rows,
    padded_head_dim,
    pair_window,
    segments_read,
    tile_logits,
    tiled,
)

_LN2 = math.log(2.0)
_DTYPES = (jnp.float16, jnp.bfloat16)
_REGISTER_TILES_LIMIT = 192  # of a consumer thread's 232 registers: the rest for everything else
SHARED_MEMORY = 227 * 1024
# The backward's dq kernel follows `MosaicConfig.longest_first` (a switch for A/Bs: stop 41)
BACKWARD_LONGEST_FIRST = True


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MosaicConfig:
    """Tiling of the Mosaic GPU kernels.

    block_q: forward query rows per consumer warpgroup (a program holds 2 * block_q).
    block_kv: forward keys per pipeline step.
    num_stages: depth of the forward's K/V shared-memory ring (>= 2 lets loads run ahead).
    bwd_block_q: dq's query rows per consumer, and dk/dv's queries per pipeline step.
    bwd_block_kv: dk/dv's key rows per consumer, and dq's keys per pipeline step.
    bwd_num_stages: depth of both backward kernels' rings.
    bwd_dkdv_stages: depth of the dk/dv kernel's ring where it differs (None: bwd_num_stages);
      at H = 256 with bwd_head_split the dq kernel fits 1 stage (which it runs as 2 stages of
      half the keys: `flash_mosaic_bwd.DQ_HALF_KEYS`), the dk/dv kernel 2.
    schedule_barrier: the forward's two consumers take turns (one runs its softmax while the
      other's matmuls hold the tensor cores), as FlashAttention-3's ping-pong schedule does.
    persistent: the forward runs one program per SM, each looping over query tiles: the next
      tile's K/V loads and Q load run under this tile's last steps and output store (O gets
      its own shared-memory buffer).
    longest_first: causal (and right-bounded window) forward: the query tiles that see the most
      keys start first, the short ones fill the tail; under a flex block mask, the query blocks
      with the longest visit lists (`_visit_lists`). The backward's dq kernel orders its causal
      query tiles the same way (not under a block mask; `BACKWARD_LONGEST_FIRST`).
    early_k_wait: the forward waits for the next K tile while P V runs on the tensor cores, not
      before its Q K^T.
    named_barrier: the ping-pong turns meet at a hardware named barrier (`bar.sync`) rather
      than a shared-memory mbarrier (on the GPU; interpret mode keeps the mbarrier).
    softmax_overlap: FlashAttention-3's intra-warpgroup overlap in the forward: each step issues
      Q K^T of its key tile with P V of the previous one and runs its softmax while P V is on
      the tensor cores (a second score tile in registers). Only on the key tiles that need no
      mask: masked edge tiles, and every tile under a dense mask or segment ids, run plain.
    bwd_head_split: above H = 128 the backward's dk/dv kernel splits dK and dV by columns over
      its two consumers (both on one block of keys; each computes S^T and dP^T of half of
      each step's queries, `flash_mosaic_bwd.QUERY_SPLIT`), so that its accumulators fit
      registers and the backward runs on Mosaic GPU; off, the Triton backward serves H > 128.
      On by default above H = 128 since it was timed on the H200 (`default_config`).
    bwd_fused_dq: one backward kernel instead of two (FlashAttention-2/3's dQ by atomics): the
      dk/dv kernel also computes each step's dQ contribution dS @ K (dS^T through shared
      memory, read transposed by the wgmma; 64 columns of dQ per wgmma) and adds it into a
      float32 dQ in global memory with TMA reduce-add stores; the dq kernel, which computed S
      and dP a second time, does not run: 5 matmuls per tile pair instead of 7. dQ's float32
      sums then depend on the order of the adds (not bit-reproducible run to run). Under
      jax.vmap the mapped axes fold into the batch (its launch, pl.kernel with dQ as a Ref,
      batches no other way: `flash_mosaic_bwd.folding_vmap`; on the H200 since stop 36). Off
      by default, as it is not deterministic: faster than the two kernels at H = 64 and
      non-causal H = 128, slower causal at H = 128 (stop 33, benchmarks/NOTES.md).
    redo_hidden: the forward reads nothing in XLA to keep a NaN or inf in a hidden key from
      reaching its rows (`flag_nonfinite` reads V, about 25 us at 16k tokens x 2048 on an H200).
      It runs without the cleaning; a consumer whose accumulator turned non-finite on some tile
      then, after the program's last tile, computes its tiles again with the cleaning, loading
      and cleaning each K, V tile itself (a slow path for inputs that hold NaN or inf). The
      first pass's marks also flag V for the backward, which then reads only K. Needs
      num_stages >= 2 (each consumer redoes in a ring slot of its own); else the flag is read.
      Not under flex_attention (a score_mod may make padded rows non-finite on every call).
      None (the default): where it measured faster, `redo_defaults`.
    bwd_redo_hidden: the same for the backward's dq kernel (K, V's cleaning): it runs without the
      cleaning and reads no flag in XLA (`flag_nonfinite` reads K, and V where the forward did
      not flag it); a consumer whose dQ rows went non-finite then computes them again, loading
      and cleaning each tile itself. Needs bwd_num_stages >= 2; not with bwd_fused_dq (the
      dk/dv kernel cleans its own keys there) nor under flex_attention. None: `redo_defaults`.
    Blocks are 64 or 128 (the forward's block_kv may be any multiple of 64).
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    schedule_barrier: bool = True
    persistent: bool = False
    longest_first: bool = True
    early_k_wait: bool = True
    named_barrier: bool = False
    softmax_overlap: bool = False
    bwd_block_q: int = 64
    bwd_block_kv: int = 64
    bwd_num_stages: int = 2
    bwd_dkdv_stages: int | None = None
    bwd_head_split: bool = False
    bwd_fused_dq: bool = False
    redo_hidden: bool | None = None
    bwd_redo_hidden: bool | None = None

    def __post_init__(self):
        ints = (
            "block_q",
            "block_kv",
            "num_stages",
            "bwd_block_q",
            "bwd_block_kv",
            "bwd_num_stages",
            "bwd_dkdv_stages",
        )
        bools = (
            "schedule_barrier",
            "persistent",
            "longest_first",
            "early_k_wait",
            "named_barrier",
            "softmax_overlap",
            "bwd_head_split",
            "bwd_fused_dq",
            "redo_hidden",
            "bwd_redo_hidden",
        )
        optional = ("bwd_dkdv_stages", "redo_hidden", "bwd_redo_hidden")
        common.check_config_fields(self, ints=ints, bools=bools, optional=optional)
        for name in ("block_q", "block_kv", "bwd_block_q", "bwd_block_kv"):
            value = getattr(self, name)
            if value < 64 or value % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {value}")
            if name != "block_kv" and value > 128:
                raise ValueError(f"{name} must be 64 or 128 (rows per warpgroup), got {value}")
        for name in ("num_stages", "bwd_num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def fits_shared_memory(nbytes: int) -> bool:
    """Whether a kernel's buffers fit an H100's shared memory (4 KiB kept for barriers and
    alignment: the estimates below count only the buffers)."""
    return nbytes + 4096 <= SHARED_MEMORY


def shared_memory_estimate(config: MosaicConfig, head_dim: int, pair_itemsize: int) -> int:
    """Bytes of the forward's buffers (16-bit Q, K, V; pair_itemsize: bias + mask bytes per
    element of a [2 * block_q, block_kv] tile)."""
    rows = CONSUMERS * config.block_q
    h_pad = padded_head_dim(head_dim)
    per_stage = 2 * config.block_kv * h_pad * 2 + rows * config.block_kv * pair_itemsize
    return rows * h_pad * 2 + config.num_stages * per_stage + rows * 4 + 4 * config.block_kv


def o_buffer_fits(config: MosaicConfig, head_dim: int, pair_itemsize: int) -> bool:
    """Whether a persistent forward's O fits a buffer of its own beside the others."""
    o_bytes = CONSUMERS * config.block_q * padded_head_dim(head_dim) * 2
    return fits_shared_memory(shared_memory_estimate(config, head_dim, pair_itemsize) + o_bytes)


def backward_shared_memory_estimate(config: MosaicConfig, head_dim: int, pair_itemsize: int) -> int:
    """Bytes of the larger of the two backward kernels' buffers (with bwd_head_split above
    H = 128 the dk/dv kernel's two consumers share one block of keys, and without a bias or
    mask tile exchange halves of P^T and dS^T; with bwd_fused_dq only
    the dk/dv kernel runs, with dS^T and a float32 dQ tile per consumer besides)."""
    parts = backward_head_parts(config, head_dim)
    h_pad = flash_mosaic_bwd.backward_head_dim(head_dim, parts)
    bq, bk, stages = config.bwd_block_q, config.bwd_block_kv, config.bwd_num_stages
    dkdv_stages = config.bwd_dkdv_stages or stages
    key_buffers = 1 if parts > 1 else CONSUMERS
    pair = CONSUMERS * bq * bk * pair_itemsize
    dq = CONSUMERS * bq * (2 * h_pad * 2 + 3 * 4) + stages * (2 * bk * h_pad * 2 + pair + 4 * bk)
    pair_t = key_buffers * bk * bq * pair_itemsize
    dkdv = key_buffers * bk * (2 * h_pad * 2 + 4) + dkdv_stages * (
        2 * bq * h_pad * 2 + pair_t + 12 * bq
    )
    if config.bwd_fused_dq and parts > 1:
        return dkdv + CONSUMERS * (bk * bq * 2 + bq * (h_pad // parts) * 4)
    if parts > 1 and flash_mosaic_bwd.QUERY_SPLIT and not pair_itemsize:
        dkdv += 2 * bk * bq * 2  # the consumers' halves of P^T and dS^T (`_query_split`)
    if config.bwd_fused_dq:  # dS^T double-buffered, a dQ chunk per consumer (`add_dq`)
        return dkdv + CONSUMERS * (2 * bk * bq * 2 + bq * flash_mosaic_bwd.DQ_CHUNK * 4)
    return max(dq, dkdv)


def fits_registers(registers_per_thread: int) -> bool:
    """Whether float32 register tiles of this many registers per consumer thread leave room for
    the rest; beyond it the kernel spills (on the H100, backward tiles of 128 keys at H=128 ran
    3-5x slower than 64, and the dk/dv kernel at H=256 ran at 110-120 TFLOP/s)."""
    return registers_per_thread <= _REGISTER_TILES_LIMIT


def register_tiles(config: MosaicConfig, head_dim: int) -> int:
    """Registers per forward consumer thread that S [block_q, block_kv] and O [block_q, H] take;
    with softmax_overlap also the previous step's P (16-bit, an operand of the P V in flight).
    On the H200 the overlap at H = 64 with 64 x 256 key tiles (224 by this count) spilled and
    ptxas serialized its wgmma; at H = 128 (160) and H = 256 (176) it did not."""
    h_pad = padded_head_dim(head_dim)
    p_prev = config.block_kv // 2 if config.softmax_overlap else 0
    return config.block_q * (config.block_kv + p_prev + h_pad) // THREADS_PER_WARPGROUP


def backward_head_parts(config: MosaicConfig, head_dim: int) -> int:
    """Column parts of dK and dV in the dk/dv kernel (1: each consumer holds all of them)."""
    return flash_mosaic_bwd.head_parts(head_dim) if config.bwd_head_split else 1


def backward_register_tiles(config: MosaicConfig, head_dim: int) -> int:
    """The larger of the two backward kernels' register tiles per consumer thread: dq holds dQ
    [bq, H] and S, dP [bq, bk]; dk/dv holds its part of dK, dV [bk, H / parts] and S^T, dP^T
    [bk, bq] (`backward_head_parts`: 2 with bwd_head_split above H = 128), and with
    bwd_fused_dq, once S^T and dP^T are spent, a dQ chunk [bq, 64]."""
    parts = backward_head_parts(config, head_dim)
    h_pad = flash_mosaic_bwd.backward_head_dim(head_dim, parts)
    bq, bk = config.bwd_block_q, config.bwd_block_kv
    dq = bq * (h_pad + 2 * bk)
    dkdv = bk * (2 * h_pad // parts + 2 * bq)
    if config.bwd_fused_dq:
        fused_dq = bk * 2 * h_pad // parts + bq * flash_mosaic_bwd.DQ_CHUNK
        return max(dkdv, fused_dq) // THREADS_PER_WARPGROUP
    return max(dq, dkdv) // THREADS_PER_WARPGROUP


def choose_config(
    tuned: MosaicConfig | None, head_dim: int, pair_itemsize: int, causal: bool = False
) -> MosaicConfig:
    """`tuned` if its forward fits shared memory with pair_itemsize bytes of bias/mask per
    element (the tables are measured without: a float32 bias adds 4 bytes per logit and stage),
    else `default_config`."""
    if tuned is not None and fits_shared_memory(
        shared_memory_estimate(tuned, head_dim, pair_itemsize)
    ):
        return tuned
    return default_config(head_dim, pair_itemsize, causal=causal)


def redo_defaults(config: MosaicConfig, head_dim: int, *, segments: bool = False) -> MosaicConfig:
    """config with redo_hidden and bwd_redo_hidden set where it leaves them None: each where it
    timed faster on the H200 (stops 38-39, benchmarks/NOTES.md; finite inputs, ms, causal):
    - the forward's wherever its second pass fits registers: at H = 128 (padded) 0.190 vs 0.207
      (cleaning) at T = 1k, 0.527 vs 0.567 at 4k, 1.825 vs 1.820 at 16k; at H = 256 0.257 vs
      0.285 at 2k and 1.624 vs 1.697 at 16k; at H = 64 on 64 x 128 score tiles 0.429 vs 0.445
      at 2k and 2.49 vs 2.62 at 16k (ptxas: no spills). Not at H = 64 on larger score tiles
      (default_config's 64 x 256), where it spills registers (620 bytes of spill loads against
      160) and the forward at 16k took 2.70 ms against 2.39. H = 192 (not timed) follows 256.
      The rule counts one score tile: the H200 table's H = 64 causal T <= 4096 entry (stop 39's
      retune) runs the redo beside the softmax overlap's second tile, timed by its tune (0.72
      ms at 4k against 0.74 for the cleaning on 64 x 256 tiles); ptxas: 168 registers, no
      spills (stop 40). Not with segment ids (`segments`): the forward of 4 unequal causal
      documents at H = 128, T = 4k took 0.716 ms with it against 0.675 (stop 40);
    - the dq kernel's up to H = 128: forward+backward at H = 128 0.805 vs 0.836 ms (1k) and
      2.247 vs 2.328 (4k), at H = 64 16k 10.54 vs 10.72; with segment ids even (2.663 vs
      2.665 ms in the case above, the forward cleaning). Not at H = 256 (the forward's redo
      alone 1.852 and 12.39 ms at 2k and 16k, with the dq kernel's 1.872 and 12.47)."""
    h_pad = padded_head_dim(head_dim)
    if config.redo_hidden is None:
        spills = h_pad <= 64 and config.block_q * config.block_kv > 64 * 128
        config = dataclasses.replace(config, redo_hidden=not spills and not segments)
    if config.bwd_redo_hidden is None:
        config = dataclasses.replace(config, bwd_redo_hidden=h_pad <= 128)
    return config


def default_config(head_dim: int, pair_itemsize: int = 0, *, causal: bool = False) -> MosaicConfig:
    """The first tiling that fits shared memory; the first is what the H100 tuning picked at
    H=128 (forward 64x128 tiles, 2 stages; backward 64x64). At H <= 64 the forward takes 64 x 256
    key tiles over 3 stages first: 4-15% faster than 64 x 128 in all four cells of both H200
    variant runs (benchmarks/NOTES.md), as the H100 tuning also found at long T.
    The softmax overlap is on at H > 128, and at H = 128 without causal: in two H200 runs it
    gained 4-11% at H = 256 (non-causal; 1-5% causal) and 2-7% at H = 128 non-causal, lost up to
    5% at H = 128 causal, and at H = 64 its two score tiles do not fit registers beside 64 x 256
    key tiles (64 x 128 tiles with it ran slower than 64 x 256 without).
    Above H = 128 the backward splits dK and dV by columns over the dk/dv kernel's consumers
    (`bwd_head_split`) with a 2-stage dk/dv ring beside dq's 1 (`bwd_dkdv_stages`): at H = 256 on
    the H200, forward+backward 316-375 TFLOP/s non-causal and 220-320 causal (T = 1k-16k), where
    the Triton backward it replaces gave 142-204 and cuDNN 240-434 (results/
    mosaic_variants_h200_bwd_split.json).
    jattn.autotune's tables override it where they have an entry."""
    h_pad = padded_head_dim(head_dim)
    forward = [(64, 128, 2), (64, 64, 2), (64, 64, 1)]
    if h_pad <= 64:
        forward.insert(0, (64, 256, 3))
    backward = [(64, 64, 2, None), (64, 64, 1, None)]
    head_split = h_pad > 128
    if head_split:
        backward.insert(0, (64, 64, 1, 2))
    for (bq, bk, stages), (bwd_q, bwd_k, bwd_stages, dkdv) in itertools.product(forward, backward):
        config = MosaicConfig(
            block_q=bq,
            block_kv=bk,
            num_stages=stages,
            bwd_block_q=bwd_q,
            bwd_block_kv=bwd_k,
            bwd_num_stages=bwd_stages,
            bwd_dkdv_stages=dkdv,
            bwd_head_split=head_split,
        )
        if fits_shared_memory(
            shared_memory_estimate(config, head_dim, pair_itemsize)
        ) and fits_shared_memory(backward_shared_memory_estimate(config, head_dim, pair_itemsize)):
            break
    overlap = dataclasses.replace(config, softmax_overlap=True)
    if (h_pad > 128 or (h_pad == 128 and not causal)) and fits_registers(
        register_tiles(overlap, head_dim)
    ):
        return overlap
    return config


# --- the kernel ---------------------------------------------------------------------------------


def _with_cleaning(st: Static) -> Static:
    """st with `clean_hidden` where tiles can hide keys. With one ring stage a cleaned tile's K
    is ready only once its V landed, in the slot that the previous tile's P V still holds: so
    no step may wait for the next K before that P V is done. One stage then takes off the
    softmax overlap (its step waits for K_j before issuing P_{j-1} V_{j-1}) and the ping-pong
    turns (consumer 1's P V waits for consumer 0's next Q K^T)."""
    st = dataclasses.replace(st, clean_hidden=hides_keys(st))
    # redo_hidden: where tiles can hide keys, with a ring slot for each consumer's redo
    redo = st.redo_hidden and st.clean_hidden and st.num_stages >= CONSUMERS
    st = dataclasses.replace(st, redo_hidden=redo)
    if st.clean_hidden and st.num_stages == 1:
        st = dataclasses.replace(
            st, softmax_overlap=False, schedule_barrier=False, named_barrier=False
        )
    return st


def _tile_coords(st: Static, tile, shape: tuple[int, int, int]):
    """(head, q_tile, batch) of a program's tile. shape: (heads, q_tiles, batch).

    A persistent program's tile is a flat index: query tiles vary fastest (the programs that run
    together read the same K and V from L2), or, with longest_first and a causal reach, the query
    tiles that see the most keys go first, so that the short ones fill the tail."""
    heads, q_tiles, batch_size = shape
    longest_first = st.longest_first and st.right is not None
    if not st.persistent:
        head, q_tile = lax.axis_index("heads"), lax.axis_index("q_tiles")
        batch = lax.axis_index("batch")
        return head, (q_tiles - 1 - q_tile) if longest_first else q_tile, batch
    if longest_first:
        q_tile, rest = q_tiles - 1 - tile // (heads * batch_size), tile % (heads * batch_size)
        return rest % heads, q_tile, rest // heads
    q_tile, rest = tile % q_tiles, tile // q_tiles
    return rest % heads, q_tile, rest // heads


def _forward_kernel(refs, scratch, *, st: Static, programs: int):
    q_ref, k_ref, v_ref, bounds_ref = refs["q"], refs["k"], refs["v"], refs["bounds"]
    out_ref, lse_ref = refs["out"], refs["lse"]
    block_q, block_kv, stages = st.block_q, st.block_kv, st.num_stages
    batch_size, t_pad, num_heads, _ = q_ref.shape
    rows_per_program = CONSUMERS * block_q
    grid = (num_heads, t_pad // rows_per_program, batch_size)
    wg = lax.axis_index("wg")
    if st.persistent:  # tiles program, program + programs, ... of the flat grid
        program = lax.axis_index("programs")
        num_tiles = math.prod(grid)
        my_tiles = idiv(num_tiles - 1 - program, programs) + 1
    else:
        program, my_tiles = 0, 1

    def tile_of(i):
        """head, batch, bounds, first query row and key-block range [lo, hi) of tile i (with a
        flex block mask: the visits [0, n) of its list, `block_of` maps them to key blocks)."""
        head, q_tile, batch = _tile_coords(st, program + i * programs, grid)
        bounds = (bounds_ref[batch, 0], bounds_ref[batch, 1], bounds_ref[batch, 2])
        program_first = q_tile * rows_per_program
        if st.flex_blocks:  # the list names its query block (lists longest first)
            program_first = scratch["blocks"][2] * rows_per_program
            return head, batch, bounds, program_first, 0, scratch["blocks"][0]
        lo, _, _, hi = key_blocks(st, bounds, program_first, rows_per_program)
        return head, batch, bounds, program_first, lo, hi

    def block_of(step):
        """The key block of visit `step`: itself, or the block mask list's step-th entry."""
        return scratch["blocks"][3 + step] if st.flex_blocks else step

    def cleaned_at(batch, bounds, program_first, lo, hi):
        """step -> whether the producer cleans its tile (`cleaned_steps`); both consumers then
        wait for that (`kv_cleaned`) instead of the copy."""
        n_partial = scratch["blocks"][1] if st.flex_blocks else None
        nonfinite = bounds_ref[batch, NONFINITE]
        return cleaned_steps(
            st, bounds, nonfinite, program_first, rows_per_program, lo, hi, n_partial
        )

    def await_block_list():  # a flex block mask: this program's list, in shared memory
        if not st.flex_blocks:
            return

        @pl.when(wg == CONSUMERS)
        def _():
            head, q_tile, batch = _tile_coords(st, program, grid)
            lists = refs["blocks"]  # [B', N', QB, L]: B', N' may broadcast
            row = pair_window(lists, batch, head, q_tile, pl.ds(0, lists.shape[-1]))
            plgpu.copy_gmem_to_smem(row, scratch["blocks"], scratch["blocks_ready"])

        plgpu.barrier_wait(scratch["blocks_ready"])

    # The K/V ring continues across a persistent program's tiles: the `count`-th key block the
    # program visits uses slot count % stages (each barrier's phase follows its waits).
    def slot_of(count):
        if isinstance(count, int):  # static (a tile's first step, count 0): a Python int, not a
            return count % stages  # constant array, which the wgmma regions reject on JAX 0.11
        return irem(count, stages)

    await_block_list()

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def produce_tile(i, base):
            head, batch, bounds, program_first, lo, hi = tile_of(i)
            kv_head = idiv(head, st.groups)
            program_rows = pl.ds(program_first, rows_per_program)

            if st.clean_hidden:
                is_cleaned = cleaned_at(batch, bounds, program_first, lo, hi)

            @pl.loop(lo, hi)
            def _(step):
                count = base + step - lo
                slot = slot_of(count)
                keys = pl.ds(block_of(step) * block_kv, block_kv)

                def await_release(consumed):  # the slot's previous tiles, once the ring is full
                    pl.when(count >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))

                def issue(produced, v_produced):
                    await_release(scratch["k_consumed"])
                    plgpu.copy_gmem_to_smem(
                        k_ref.at[batch, keys, kv_head], scratch["k"].at[slot], produced
                    )
                    for name in ("bias", "mask"):
                        if name in refs:
                            window = pair_window(refs[name], batch, head, program_rows, keys)
                            plgpu.copy_gmem_to_smem(window, scratch[name].at[slot], produced)
                    if st.has_segments:
                        plgpu.copy_gmem_to_smem(
                            refs["kv_seg"].at[batch, keys], scratch["kv_seg"].at[slot], produced
                        )
                    await_release(scratch["v_consumed"])
                    plgpu.copy_gmem_to_smem(
                        v_ref.at[batch, keys, kv_head], scratch["v"].at[slot], v_produced
                    )

                if not st.clean_hidden:
                    issue(scratch["k_produced"].at[slot], scratch["v_produced"].at[slot])
                    return
                cleaned = is_cleaned(step)

                @pl.when(~cleaned)
                def _():
                    issue(scratch["k_produced"].at[slot], scratch["v_produced"].at[slot])

                @pl.when(cleaned)
                def _():
                    arrived = scratch["kv_arrived"].at[slot]
                    issue(arrived, arrived)
                    k, v, done = (scratch[n].at[slot] for n in ("k", "v", "kv_cleaned"))
                    clean_landed_tile(arrived, done, k, v, poison_keys=True)

            return base + jnp.maximum(hi - lo, 0)

        total = _over_tiles(st, my_tiles, produce_tile)

        # Drain: observe the consumers' release of the last slots too, so that every phase of
        # every barrier is waited on by its waiter (the interpreter checks it; on the GPU it
        # only keeps the producer alive until the consumers are done).
        @pl.loop(jnp.maximum(0, total - stages), total)
        def _(count):
            plgpu.barrier_wait(scratch["k_consumed"].at[slot_of(count)])
            plgpu.barrier_wait(scratch["v_consumed"].at[slot_of(count)])

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_smem = scratch["q"].at[wg]

        def load_q(i):
            head, batch, _, program_first, _, _ = tile_of(i)
            rows = pl.ds(program_first + wg * block_q, block_q)
            produced = scratch["q_produced"].at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, produced)
            if st.has_segments:
                plgpu.copy_gmem_to_smem(
                    refs["q_seg"].at[batch, rows], scratch["q_seg"].at[wg], produced
                )

        # The ping-pong schedule: a two-party barrier the consumers meet at twice a step, right
        # after issuing Q K^T and right after their softmax, so that one's softmax overlaps the
        # other's matmuls. Consumer 1 starts one meeting late (consumer 0 goes first), and
        # consumer 0 makes it up at the end, so both meet 2 * steps + 1 times per tile.
        turn = scratch.get("turn")  # the mbarrier; None with named_barrier or no schedule

        def take_turns():
            if st.named_barrier:
                named_barrier_sync(TURN_BARRIER, CONSUMERS * THREADS_PER_WARPGROUP)
            elif turn is not None:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        def tile_consumer(st: Static, redo: bool):
            """consume_tile(i, carry) under `st`. carry: the key blocks visited so far, and with
            st.redo_hidden the rows [block_q] whose accumulator went non-finite on some tile.
            redo: the slow path of redo_hidden, once the producer is done: this consumer loads
            Q and each K, V tile itself into its own ring slot (`wg`), cleans the masked ones
            as the producer would (`clean_tile`), and stores O and lse again.
            A persistent program loads the next tile's Q while it writes this tile's O when O
            has its own buffer (it fits shared memory); otherwise O takes Q's place, and the
            next Q load waits until the store has read O out."""
            o_smem = scratch["o"].at[wg] if st.o_buffer else q_smem

            def consume_tile(i, carry):
                base, bad_rows = carry if st.redo_hidden else (carry, None)
                return _consume_tile(st, redo, o_smem, i, base, bad_rows)

            return consume_tile

        def _consume_tile(st, redo, o_smem, i, base, bad_rows):
            head, batch, bounds, program_first, lo, hi = tile_of(i)
            q_first = program_first + wg * block_q
            rows = pl.ds(q_first, block_q)
            if redo:  # O of the tile before sits in Q's buffer until its store has read it
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                load_q(i)
            plgpu.barrier_wait(scratch["q_produced"].at[wg])
            q_seg = None
            if st.has_segments:
                q_seg = load_vector(st, scratch["q_seg"].at[wg], WGMMA_ROW)
            if st.flex_blocks:  # the list's partial blocks first, then its full ones
                inner_lo, inner_hi = scratch["blocks"][1], hi
            else:
                _, inner_lo, inner_hi, _ = key_blocks(st, bounds, q_first, block_q)
            if st.schedule_barrier:
                pl.when(wg == 1)(take_turns)

            if st.clean_hidden:
                is_cleaned = cleaned_at(batch, bounds, program_first, lo, hi)
            if redo:  # every batch row as if flagged
                n_partial = scratch["blocks"][1] if st.flex_blocks else None
                is_cleaned = cleaned_steps(
                    st, bounds, 1, program_first, rows_per_program, lo, hi, n_partial
                )
            folded = folded_scale(st)

            def slot_at(step):
                return wg if redo else slot_of(base + step - lo)

            def load_own_tile(step):
                """redo: the step's K, V (and bias, mask, key ids) into this consumer's slot,
                cleaned where the step can hide a key."""
                slot, landed = wg, scratch["redo_landed"].at[wg]
                keys = pl.ds(block_of(step) * block_kv, block_kv)
                kv_head = idiv(head, st.groups)
                k_tile, v_tile = scratch["k"].at[slot], scratch["v"].at[slot]
                plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_tile, landed)
                for name in ("bias", "mask"):
                    if name in refs:
                        program_rows = pl.ds(program_first, rows_per_program)
                        window = pair_window(refs[name], batch, head, program_rows, keys)
                        plgpu.copy_gmem_to_smem(window, scratch[name].at[slot], landed)
                if st.has_segments:
                    plgpu.copy_gmem_to_smem(
                        refs["kv_seg"].at[batch, keys], scratch["kv_seg"].at[slot], landed
                    )
                plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_tile, landed)
                plgpu.barrier_wait(landed)

                @pl.when(is_cleaned(step))
                def _():
                    clean_tile(k_tile, v_tile, poison_keys=True)
                    plgpu.commit_smem()

            def release(name, slot):  # the ring slot's tile, to the producer
                if not redo:
                    plgpu.barrier_arrive(scratch[name].at[slot])

            def wait_k(step, early: bool = False):
                """K of `step`, and V too where the producer cleaned the tile. early: a wait
                while the previous step's P V runs, which leaves a cleaned tile to
                `wait_cleaned` (its cleaning may need the V slot that P V still holds)."""
                if redo:
                    return load_own_tile(step)
                slot = slot_of(base + step - lo)
                if not st.clean_hidden:
                    plgpu.barrier_wait(scratch["k_produced"].at[slot])
                    return
                cleaned = is_cleaned(step)
                if not early:
                    wait_cleaned(step)
                pl.when(~cleaned)(lambda: plgpu.barrier_wait(scratch["k_produced"].at[slot]))

            def wait_cleaned(step):
                if st.clean_hidden and not redo:
                    slot = slot_of(base + step - lo)
                    wait = lambda: plgpu.barrier_wait(scratch["kv_cleaned"].at[slot])
                    pl.when(is_cleaned(step))(wait)

            def wait_v(step):
                if redo:  # landed with K
                    return
                slot = slot_of(base + step - lo)
                if not st.clean_hidden:
                    plgpu.barrier_wait(scratch["v_produced"].at[slot])
                    return
                wait = lambda: plgpu.barrier_wait(scratch["v_produced"].at[slot])
                pl.when(~is_cleaned(step))(wait)

            def tile_inputs(slot, masked: bool):
                """The bias, mask and key segment ids of a ring slot (read before its release);
                the ids only where the tile reads them (`segments_read`)."""
                bias = mask = kv_seg = None
                if st.has_bias:
                    bias = scratch["bias"][slot, pl.ds(wg * block_q, block_q)].astype(jnp.float32)
                if st.has_mask:
                    mask = scratch["mask"][slot, pl.ds(wg * block_q, block_q)]
                if segments_read(st, masked):
                    kv_seg = load_vector(st, scratch["kv_seg"].at[slot], WGMMA_COL)
                return bias, mask, kv_seg

            def logits_of(qk, inputs, step, masked: bool):
                """Base-2 logits of a tile, -inf where a query does not see a key."""
                bias, mask, kv_seg = inputs
                k_first = block_of(step) * block_kv
                flex = st.flex
                if flex is not None:  # the user's mods on scale * q.k, over index vectors
                    q_idx, k_idx = flex_indices(
                        st, qk.shape, q_first, k_first, bounds, masked=masked
                    )
                vectors = flex_vectors(st, q_seg, kv_seg)
                if flex is not None and flex.score_mod is not None:
                    logits = flex_forward_logits(st, qk, batch, head, q_idx, k_idx, vectors=vectors)
                elif folded is not None:  # q.k itself; online_softmax scales it
                    logits = qk
                else:
                    logits, _ = tile_logits(st, qk, bias)
                if not masked:
                    return logits
                user_visible = None
                if flex is not None and flex.mask_mod is not None:
                    user_visible = flex_visible(st, batch, head, q_idx, k_idx, vectors=vectors)
                return hide_invisible(
                    st,
                    logits,
                    q_first=q_first,
                    k_first=k_first,
                    bounds=bounds,
                    q_seg=q_seg,
                    kv_seg=kv_seg,
                    mask=mask,
                    user_visible=user_visible,
                )

            def online_softmax(logits, m_i, l_i):
                """(p, m, l, alpha) after one tile: p = exp2(logits - m) [bq, bk] float32, the
                running max m and sum l [bq], alpha = exp2(m_old - m) rescales what came before.
                With `folded`, logits is q.k (-inf where hidden) and the base-2 logits are
                q.k * folded: the max is taken on q.k and scaled per row, and the scaling rides
                in exp2's argument, one FFMA per element (as FlashAttention-3 and tokamax do),
                not a separate multiply before the max."""
                tile_max = logits.max(axis=1)
                if folded is not None:
                    tile_max = tile_max * folded
                m_new = jnp.maximum(m_i, tile_max)
                # A row with nothing visible so far keeps m = -inf: shift by 0 there (no inf - inf).
                m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_shift)
                if folded is not None:
                    logits = logits * folded
                p = jnp.exp2(logits - lax.broadcast_in_dim(m_shift, logits.shape, [0]))
                return p, m_new, l_i * alpha + p.sum(axis=1), alpha

            def visit(step, carry, *, masked: bool):
                acc, m_i, l_i = carry  # [bq, Hp] f32; [bq] f32 running max (base 2); [bq] sum
                slot = slot_at(step)
                if not st.early_k_wait:
                    wait_k(step)
                else:
                    wait_cleaned(step)
                qk = mma_transposed(
                    st, q_smem, scratch["k"].at[slot], take_turns if st.schedule_barrier else None
                )
                inputs = tile_inputs(slot, masked)
                release("k_consumed", slot)
                logits = logits_of(qk, inputs, step, masked)
                p, m_new, l_i, alpha = online_softmax(logits, m_i, l_i)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p = p.astype(q_ref.dtype)
                if not st.schedule_barrier:
                    wait_v(step)
                elif st.named_barrier:  # finish the softmax before handing the tensor cores over
                    acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
                    wait_v(step)
                    take_turns()
                else:
                    acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
                    plgpu.barrier_arrive(turn)
                    wait_v(step)
                    plgpu.barrier_wait(turn)

                def wait_next_k():  # while P V runs: the next step's K
                    pl.when(step + 1 < hi)(lambda: wait_k(step + 1, early=True))

                acc = mma_accumulate(
                    st, acc, p, scratch["v"].at[slot], wait_next_k if st.early_k_wait else None
                )
                release("v_consumed", slot)
                return acc, m_new, l_i

            def overlapped(first, end, carry):
                """The unmasked steps [first, end) (first < end) with FlashAttention-3's
                intra-warpgroup overlap: step j issues Q K_j^T and P_{j-1} V_{j-1} together and
                runs the softmax of S_j while P V is still on the tensor cores; the first step
                has no P V before it, the last P V comes after the loop. K of `first` is waited
                on entry with early_k_wait, as `visit` leaves it; K of `end` on exit likewise.
                Masked steps stay out: their mask arithmetic beside a second score tile and a
                P V in flight is what the register budget cannot hold."""
                acc, m_i, l_i = carry

                def turns():
                    if st.schedule_barrier:
                        take_turns()

                slot = slot_of(base + first - lo)
                if not st.early_k_wait:
                    wait_k(first)
                else:
                    wait_cleaned(first)
                qk = mma_transposed(st, q_smem, scratch["k"].at[slot], turns)
                inputs = tile_inputs(slot, False)
                plgpu.barrier_arrive(scratch["k_consumed"].at[slot])
                p, m_i, l_i, alpha = online_softmax(logits_of(qk, inputs, first, False), m_i, l_i)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                turns()

                def step_with_overlap(step, carry):
                    acc, m_i, l_i, p_prev = carry  # p_prev: [bq, bk] of step - 1, input dtype
                    slot, prev = slot_of(base + step - lo), slot_of(base + step - 1 - lo)
                    wait_k(step)
                    wait_v(step - 1)
                    k_ref, v_ref = scratch["k"].at[slot], scratch["v"].at[prev]

                    def softmax_of(qk, m_i, l_i):
                        inputs = tile_inputs(slot, False)
                        plgpu.barrier_arrive(scratch["k_consumed"].at[slot])
                        return online_softmax(logits_of(qk, inputs, step, False), m_i, l_i)

                    if st.interpret:  # no asynchronous wgmma: the same steps, one after another
                        qk = mma_transposed(st, q_smem, k_ref, turns)
                        acc = mma_accumulate(st, acc, p_prev, v_ref)
                        p, m_i, l_i, alpha = softmax_of(qk, m_i, l_i)
                    else:

                        def issue_both(refs):
                            acc_ref, m_ref, l_ref, p_ref, alpha_ref = refs

                            def with_scores(s_ref):
                                plgpu.wgmma(s_ref, q_smem, k_ref.transpose((1, 0)))
                                plgpu.wgmma(acc_ref, p_ref[...], v_ref)
                                turns()
                                # S_j is ready once at most one wgmma (P V) is in flight
                                qk = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
                                p, m_new, l_new, alpha = softmax_of(qk, m_ref[...], l_ref[...])
                                m_ref[...], l_ref[...], alpha_ref[...] = m_new, l_new, alpha
                                p_ref[...] = p.astype(p_ref.dtype)

                            pl.run_scoped(with_scores, plgpu.ACC((block_q, block_kv), jnp.float32))

                        state = (plgpu.ACC.init(acc), m_i, l_i, p_prev, l_i)  # alpha: any [bq]
                        acc, m_i, l_i, p, alpha = pl.run_state(issue_both)(state)
                    plgpu.barrier_arrive(scratch["v_consumed"].at[prev])
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    turns()
                    return acc, m_i, l_i, p.astype(q_ref.dtype)

                carry = (acc, m_i, l_i, p.astype(q_ref.dtype))
                acc, m_i, l_i, p = lax.fori_loop(first + 1, end, step_with_overlap, carry)
                last = slot_of(base + end - 1 - lo)
                wait_v(end - 1)

                def wait_end_k():  # as `visit` does for the step after it
                    pl.when(end < hi)(lambda: wait_k(end, early=True))

                acc = mma_accumulate(
                    st, acc, p, scratch["v"].at[last], wait_end_k if st.early_k_wait else None
                )
                plgpu.barrier_arrive(scratch["v_consumed"].at[last])
                return acc, m_i, l_i

            def overlapped_range(first, end, carry):
                return lax.cond(first < end, lambda: overlapped(first, end, carry), lambda: carry)

            h_pad = q_ref.shape[-1]
            acc = layout_cast(st, jnp.zeros((block_q, h_pad), jnp.float32), WGMMA)
            m_i = layout_cast(st, jnp.full((block_q,), -jnp.inf, jnp.float32), WGMMA_ROW)
            l_i = layout_cast(st, jnp.zeros((block_q,), jnp.float32), WGMMA_ROW)
            # Both consumers visit every step of [lo, hi) (the barriers count on it), masking
            # what they do not see; unmasked: this warpgroup's inner range, clipped to [lo, hi).
            if st.early_k_wait:
                pl.when(lo < hi)(lambda: wait_k(lo, early=True))
            ranges = (lo, *common.clip_inner(lo, hi, inner_lo, inner_hi), hi)
            unmasked = overlapped_range if st.softmax_overlap else None
            acc, m_i, l_i = common.visit_all(
                st, ranges, visit, (acc, m_i, l_i), unmasked, structural=st.flex_blocks or None
            )
            if st.schedule_barrier:
                pl.when(wg == 0)(take_turns)
            if st.o_buffer:  # Q is no longer needed: bring the next tile's
                pl.when(i + 1 < my_tiles)(lambda: load_q(i + 1))
            if st.redo_hidden:  # a row's sum is not finite where one of its values is not
                tile_marks = nonfinite_rows(acc)
                bad_rows = jnp.maximum(bad_rows, tile_marks)

            has_any = l_i != 0.0  # NaN (a row that sees a non-finite key) stays NaN
            inv_l = jnp.where(has_any, 1.0 / jnp.where(has_any, l_i, 1.0), 0.0)
            out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
            log_l = jnp.log2(jnp.where(has_any, l_i, 1.0))
            lse = jnp.where(has_any, (m_i + log_l) * _LN2, -jnp.inf)
            if st.o_buffer:  # the previous tile's stores have read O and lse out
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[...] = out.astype(q_ref.dtype)
            scratch["lse"][wg] = lse
            marks = st.redo_hidden and not redo and "marks" in refs  # for the backward's flag
            if marks:
                scratch["marks"][wg] = tile_marks
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[batch, rows, head])
            plgpu.copy_smem_to_gmem(scratch["lse"].at[wg], lse_ref.at[batch, head, rows])
            if marks:
                plgpu.copy_smem_to_gmem(
                    scratch["marks"].at[wg], refs["marks"].at[batch, head, rows]
                )
            if st.persistent and not st.o_buffer and not redo:  # O in Q's buffer: once stored

                @pl.when(i + 1 < my_tiles)
                def _():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    load_q(i + 1)

            base = base + jnp.maximum(hi - lo, 0)
            return (base, bad_rows) if st.redo_hidden else base

        load_q(0)
        if not st.redo_hidden:
            _over_tiles(st, my_tiles, tile_consumer(st, redo=False), 0)
            plgpu.wait_smem_to_gmem(0)
            return
        bad_rows = layout_cast(st, jnp.zeros((block_q,), jnp.float32), WGMMA_ROW)
        _, bad_rows = _over_tiles(st, my_tiles, tile_consumer(st, redo=False), (0, bad_rows))
        plgpu.wait_smem_to_gmem(0)
        # Both consumers are past their last tile, so the ring is theirs: a consumer whose rows
        # went non-finite computes its tiles again with the cleaning (rare: NaN or inf inputs).
        plgpu.barrier_arrive(scratch["passed"])
        plgpu.barrier_wait(scratch["passed"])
        slow = dataclasses.replace(
            st,
            redo_hidden=False,
            schedule_barrier=False,
            named_barrier=False,
            early_k_wait=False,
            softmax_overlap=False,
            o_buffer=False,
        )

        @pl.when(bad_rows.max(axis=0) > 0)
        def _():
            _over_tiles(slow, my_tiles, tile_consumer(slow, redo=True), 0)
            plgpu.wait_smem_to_gmem(0)


def _over_tiles(st: Static, my_tiles, body, init=0):
    """body(i, carry) over a program's tiles; carry: key blocks visited before tile i (and
    what else `init` holds after that count); returns the last carry. One tile (no loop)
    unless persistent."""
    if not st.persistent:  # count 0 as a Python int: a constant array cannot be closed over
        return body(0, init)  # by the wgmma regions (JAX 0.11 lowering)
    if isinstance(init, tuple):
        return lax.fori_loop(0, my_tiles, body, (jnp.int32(init[0]), *init[1:]))
    return lax.fori_loop(0, my_tiles, body, jnp.int32(init))


def forward(
    st: Static,
    query: Array,  # [B, T, N, H] float16/bfloat16
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    bias: Array | None,  # [B', N', T', S']
    mask: Array | None,  # [B', N', T', S'] bool
    bounds: Array,  # [B, 4] int32: q_offset, q_len, kv_len, 0 (flag_nonfinite's column)
    segment_ids: tuple[Array, Array] | None,  # [B, T], [B, S] int32
    blocks: Array | None = None,  # [B', N', QB, L] int32: a flex block mask's visit lists
    *,
    flagged: bool = False,  # bounds' NONFINITE column set from V already (`flag_nonfinite`)
    flag_values: bool = False,  # with st.redo_hidden: also return bounds flagged from V
) -> tuple[Array, ...]:  # out [B, T, N, H], lse [B, T, N] float32 (natural log)[, bounds]
    """Pad, run the kernel, unpad. `blocks` (st.flex_blocks): per program, [n, n_partial, its
    query block, key block ids (partial ones first), ...], L a multiple of 32 (a TMA moves
    128-byte rows): `_visit_lists(..., forward=True)`.

    flag_values (st.redo_hidden): bounds [B, 4] come back too, NONFINITE set in the batch rows
    where a program's first pass marked a row whose accumulator went non-finite: a V tile
    there held a NaN or an inf, which is what the backward's flag needs of V (every V tile the
    dq or dk/dv kernels multiply, some forward program multiplied), without reading V."""
    batch, q_len, num_heads, head_dim = query.shape
    kv_len = key.shape[1]
    rows_per_program = CONSUMERS * st.block_q
    t_pad = -(-q_len // rows_per_program) * rows_per_program
    s_pad = -(-kv_len // st.block_kv) * st.block_kv
    h_pad = padded_head_dim(head_dim)

    def rows(x, size):
        return common.pad_last(common.pad_to(x, 1, size), h_pad)

    def pairwise(x, dtype):  # broadcast T', S' (B', N' stay broadcast), pad
        x = jnp.broadcast_to(x, x.shape[:2] + (q_len, kv_len)).astype(dtype)
        return common.pad_to(common.pad_to(x, 2, t_pad), 3, s_pad)

    operands = {
        "q": rows(query, t_pad),
        "k": rows(key, s_pad),
        "v": rows(value, s_pad),
        "bounds": bounds if flagged or st.redo_hidden else flag_nonfinite(st, bounds, value),
    }
    if st.redo_hidden:  # the kernel runs without the cleaning and redoes what went non-finite
        st = dataclasses.replace(st, clean_hidden=False)
    stages, block_kv = st.num_stages, st.block_kv
    scratch = {
        "q": tiled((CONSUMERS, st.block_q, h_pad), query.dtype),
        "k": tiled((stages, block_kv, h_pad), query.dtype),
        "v": tiled((stages, block_kv, h_pad), query.dtype),
        "lse": plgpu.SMEM((CONSUMERS, st.block_q), jnp.float32),
    }
    flag_values = flag_values and st.redo_hidden
    if flag_values:
        scratch["marks"] = plgpu.SMEM((CONSUMERS, st.block_q), jnp.float32)
    if st.o_buffer:
        scratch["o"] = tiled((CONSUMERS, st.block_q, h_pad), query.dtype)
    produced_copies = 1
    if bias is not None:
        operands["bias"] = pairwise(bias, bias_dtype(bias.dtype))
        scratch["bias"] = tiled((stages, rows_per_program, block_kv), operands["bias"].dtype)
        produced_copies += 1
    if mask is not None:
        operands["mask"] = pairwise(mask, jnp.int8)
        scratch["mask"] = tiled((stages, rows_per_program, block_kv), jnp.int8)
        produced_copies += 1
    q_copies = 1
    if segment_ids is not None:
        operands["q_seg"] = common.pad_to(segment_ids[0].astype(jnp.int32), 1, t_pad, -1)
        operands["kv_seg"] = common.pad_to(segment_ids[1].astype(jnp.int32), 1, s_pad, -2)
        scratch["q_seg"] = plgpu.SMEM((CONSUMERS, st.block_q), jnp.int32)
        scratch["kv_seg"] = plgpu.SMEM((stages, block_kv), jnp.int32)
        produced_copies += 1
        q_copies += 1
    scratch.update(
        q_produced=plgpu.Barrier(num_arrivals=q_copies, num_barriers=CONSUMERS),
        k_produced=plgpu.Barrier(num_arrivals=produced_copies, num_barriers=stages),
        v_produced=plgpu.Barrier(num_barriers=stages),
        k_consumed=plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        v_consumed=plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
    )
    if st.clean_hidden:  # masked steps: K, V and the rest land, the producer cleans them
        scratch["kv_arrived"] = plgpu.Barrier(num_arrivals=produced_copies + 1, num_barriers=stages)
        scratch["kv_cleaned"] = plgpu.Barrier(num_barriers=stages)
    if st.redo_hidden:  # a consumer's own copies in a redo; the consumers' meeting before it
        scratch["redo_landed"] = plgpu.Barrier(
            num_arrivals=produced_copies + 1, num_barriers=CONSUMERS
        )
        scratch["passed"] = plgpu.Barrier(num_arrivals=CONSUMERS)
    if st.schedule_barrier and not st.named_barrier:
        scratch["turn"] = plgpu.Barrier(num_arrivals=CONSUMERS)
    if st.flex_blocks:
        operands["blocks"] = blocks
        scratch["blocks"] = plgpu.SMEM(blocks.shape[-1:], jnp.int32)
        scratch["blocks_ready"] = plgpu.Barrier()

    tiles = (num_heads, t_pad // rows_per_program, batch)
    if st.persistent:
        programs = min(math.prod(tiles), _programs_per_device(st))
        grid, grid_names = (programs,), ("programs",)
    else:
        programs = 1
        grid, grid_names = tiles, ("heads", "q_tiles", "batch")

    def jattn_flash_forward(*refs):  # the kernel's name in profiles (ncu -k regex:jattn)
        names = list(operands) + ["out", "lse"] + (["marks"] if flag_values else [])
        named = dict(zip(names, refs[: len(names)], strict=True))

        def with_scratch(*buffers):
            buffers = dict(zip(scratch, buffers, strict=True))
            _forward_kernel(named, buffers, st=st, programs=programs)

        pl.run_scoped(with_scratch, *scratch.values(), collective_axes="wg")

    out_type = [
        jax.ShapeDtypeStruct((batch, t_pad, num_heads, h_pad), query.dtype),
        jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32),
    ]
    if flag_values:  # 1 where a row's first-pass accumulator was not finite
        out_type.append(jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32))
    kernel = plgpu.kernel(
        jattn_flash_forward,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **interpret_kwargs(st),
    )
    out, lse, *marks = kernel(*operands.values())
    out, lse = out[:, :q_len, :, :head_dim], jnp.swapaxes(lse[:, :, :q_len], 1, 2)
    if not flag_values:
        return out, lse
    bad = (marks[0].reshape(batch, -1) > 0).any(axis=1) | (bounds[:, NONFINITE] != 0)
    return out, lse, bounds.at[:, NONFINITE].set(bad.astype(bounds.dtype))


def _schedule(config: MosaicConfig, interpret: bool) -> dict:
    """The Static fields a config sets: the forward's tiles, ring and schedule options."""
    return dict(
        block_q=config.block_q,
        block_kv=config.block_kv,
        num_stages=config.num_stages,
        schedule_barrier=config.schedule_barrier,
        interpret=interpret,
        persistent=config.persistent,
        longest_first=config.longest_first,
        early_k_wait=config.early_k_wait,
        named_barrier=config.named_barrier and not interpret,  # the interpreter runs no PTX
        softmax_overlap=config.softmax_overlap,
        redo_hidden=bool(config.redo_hidden),
    )


def _programs_per_device(st: Static) -> int:
    """A persistent forward's programs: one per SM (132 on an H100 SXM or H200 when the device
    does not say, as in a lowering for CUDA on CPU); two in interpret mode, so that tests cover
    programs that loop over several tiles."""
    if st.interpret:
        return 2
    if common.on_gpu():
        return int(getattr(jax.devices()[0], "core_count", 132))
    return 132


# --- the public entry: forward here, backward from the Triton kernels ---------------------------


def _bounds(batch, q_len, kv_len, q_offset, query_seq_lengths, key_value_seq_lengths) -> Array:
    def per_batch(x, default):
        if x is None:
            return jnp.full((batch,), default, jnp.int32)
        return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))

    return jnp.stack(
        [
            per_batch(q_offset, 0),
            per_batch(query_seq_lengths, q_len),
            per_batch(key_value_seq_lengths, kv_len),
            jnp.zeros((batch,), jnp.int32),
        ],
        axis=1,
    )


def flash_attention(
    query: Array,  # [B, T, N, H] float16/bfloat16
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    bias: Array | None,  # [B', N', T', S'] broadcastable to [B, N, T, S]
    mask: Array | None,  # [B', N', T', S'] bool
    *,
    scale: float,
    is_causal: bool,
    q_offset: Array | None,
    query_seq_lengths: Array | None,
    key_value_seq_lengths: Array | None,
    local_window_size: tuple[int, int] | None,
    segment_ids: tuple[Array, Array] | None,
    logits_soft_cap: float | None,
    config: MosaicConfig | None = None,
    tuned: MosaicConfig | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array]:  # out [B, T, N, H], lse [B, T, N] float32
    """Flash attention with validated, rank-4 inputs (see `jattn.dot_product_attention`).

    `config` is used as given; without one, `tuned` (from jattn.autotune) where its forward
    fits shared memory with this call's bias/mask tiles, else `default_config`.
    Raises NotImplementedError for what this kernel does not serve: float32/float64 (the Triton
    kernel serves float32), H > 256, a config whose forward does not fit shared memory.
    Gradients come from `flash_mosaic_bwd`, or from the Triton backward for dbias.
    """
    options = dict(
        scale=scale,
        is_causal=is_causal,
        q_offset=q_offset,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
    )
    plan, bounds = _plan(query, key, bias, mask, config, tuned, interpret, options)
    # Every array the rules need goes in as an argument (never closed over; `options` is read
    # for its static entries only): a custom_vjp whose rules close over tracers fails as soon
    # as a jit sits inside the differentiation (`jax.grad(jax.jit(f))`: "No constant handler
    # for type DynamicJaxprTracer").
    aux = (mask, bounds, segment_ids, q_offset, query_seq_lengths, key_value_seq_lengths)

    @jax.custom_vjp
    def attention(query, key, value, bias, aux):
        mask, bounds, segment_ids = aux[:3]
        return forward(plan.st, query, key, value, bias, mask, bounds, segment_ids)

    def forward_rule(query, key, value, bias, aux):
        primals = [x.value for x in (query, key, value)]
        bias_value = None if bias is None else bias.value
        aux = jax.tree.map(lambda x: x.value, aux, is_leaf=_is_primal)
        mask, bounds, segment_ids = aux[:3]
        # V's non-finite flag, set once: the forward's kernel reads it and the backward's
        # adds K's to it (`flag_nonfinite`); with redo_hidden the kernel's marks set it
        if plan.st.redo_hidden and plan.bwd_st.redo_hidden:  # no flag wanted anywhere
            out, lse = forward(plan.st, *primals, bias_value, mask, bounds, segment_ids)
        elif plan.st.redo_hidden:
            out, lse, bounds = forward(
                plan.st, *primals, bias_value, mask, bounds, segment_ids, flag_values=True
            )
        else:
            bounds = flag_nonfinite(plan.st, bounds, primals[2])
            out, lse = forward(
                plan.st, *primals, bias_value, mask, bounds, segment_ids, flagged=True
            )
        aux = (mask, bounds, *aux[2:])
        want_dbias = bias_value is not None and bias.perturbed
        return (out, lse), (*primals, bias_value, out, lse, () if want_dbias else None, aux)

    def backward_rule(residuals, cotangents):
        query, key, value, bias, out, lse, want_dbias, aux = residuals
        d_out, d_lse = cotangents
        if isinstance(d_out, jax.custom_derivatives.SymbolicZero):
            d_out = jnp.zeros(out.shape, out.dtype)
        if isinstance(d_lse, jax.custom_derivatives.SymbolicZero):
            d_lse = jnp.zeros(lse.shape, lse.dtype)
        no_aux = jax.tree.map(lambda _: None, aux)  # integer and boolean inputs: no cotangent
        grads = _gradients(
            plan, options, query, key, value, bias, aux, out, lse, d_out, d_lse,
            want_dbias=want_dbias is not None, values_flagged=True,
        )  # fmt: skip
        return (*grads, no_aux)

    attention.defvjp(forward_rule, backward_rule, symbolic_zeros=True)
    return attention(query, key, value, bias, aux)


def flash_attention_backward(
    query: Array,  # [B, T, N, H] float16/bfloat16
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    out: Array,  # [B, T, N, H]
    lse: Array,  # [B, T, N] float32
    d_out: Array,  # [B, T, N, H]
    d_lse: Array,  # [B, T, N]
    *,
    config: MosaicConfig | None = None,
    tuned: MosaicConfig | None = None,
    interpret: bool | None = None,
    **options,
) -> tuple[Array, Array, Array]:  # dq, dk, dv
    """`flash_attention`'s backward (no bias, no mask) at residuals (out, lse) computed
    elsewhere: ring attention's block gradients at the merged output and log-sum-exp, which
    are the block's share of the whole row's softmax (no forward recomputed). `options` as in
    `flash_attention`; NotImplementedError for what it does not serve."""
    plan, bounds = _plan(query, key, None, None, config, tuned, interpret, options)
    aux = (
        None,
        bounds,
        options["segment_ids"],
        options["q_offset"],
        options["query_seq_lengths"],
        options["key_value_seq_lengths"],
    )
    dq, dk, dv, _ = _gradients(
        plan, options, query, key, value, None, aux, out, lse, d_out, d_lse, want_dbias=False
    )
    return dq, dk, dv


class _Plan(NamedTuple):
    st: Static  # the forward kernel's
    bwd_st: Static  # the backward kernels'
    native_backward: bool  # the Mosaic backward serves it (else the Triton backward)


def _plan(query, key, bias, mask, config, tuned, interpret, options) -> tuple[_Plan, Array]:
    """The static configuration of one call's forward and backward kernels, and its bounds
    `[B, 4]` int32 (`_bounds`)."""
    _check_served(query)
    batch, q_len, num_heads, head_dim = query.shape
    kv_len = key.shape[1]
    pair_itemsize = (0 if bias is None else min(bias.dtype.itemsize, 4)) + (mask is not None)
    if config is None:
        config = choose_config(tuned, head_dim, pair_itemsize, options["is_causal"])
    config = redo_defaults(config, head_dim, segments=options["segment_ids"] is not None)
    interpret = common.interpret_mode() if interpret is None else interpret
    if not interpret and not fits_shared_memory(
        shared_memory_estimate(config, head_dim, pair_itemsize)
    ):
        raise NotImplementedError(
            f"{config} needs more shared memory than a Hopper GPU's {SHARED_MEMORY // 1024} KiB "
            f"for head dim {head_dim} (smaller block_kv or num_stages fit)"
        )
    s_pad = -(-kv_len // config.block_kv) * config.block_kv
    kv_lengths = options["key_value_seq_lengths"]
    st = Static(
        scale=float(options["scale"]),
        softcap=options["logits_soft_cap"],
        right=common.right_reach(options["is_causal"], options["local_window_size"]),
        left=common.left_reach(options["local_window_size"]),
        check_q_len=options["query_seq_lengths"] is not None,
        check_kv_len=kv_lengths is not None or s_pad != kv_len,
        dense_masks=mask is not None or options["segment_ids"] is not None,
        has_bias=bias is not None,
        has_mask=mask is not None,
        has_segments=options["segment_ids"] is not None,
        groups=num_heads // key.shape[2],
        **_schedule(config, interpret),
        o_buffer=config.persistent and o_buffer_fits(config, head_dim, pair_itemsize),
    )
    st = _with_cleaning(st)
    bwd_st, native_backward = _backward_static(
        st, config, head_dim, pair_itemsize, kv_len, kv_lengths is not None
    )
    bounds = _bounds(
        batch, q_len, kv_len, options["q_offset"], options["query_seq_lengths"], kv_lengths
    )
    return _Plan(st, bwd_st, native_backward), bounds


def _gradients(plan: _Plan, options, query, key, value, bias, aux, out, lse, d_out, d_lse, *,
               want_dbias: bool, values_flagged: bool = False):  # fmt: skip
    """(dq, dk, dv, dbias or None): the Mosaic backward kernels, or the Triton backward for
    dbias and for a backward that does not fit shared memory or registers. The arrays come
    from `aux`, `options` gives the static options. values_flagged: aux's bounds carry the
    forward's flag of V (`flag_nonfinite`)."""
    mask, bounds, segment_ids, q_offset, q_lengths, kv_lengths = aux
    options = options | dict(
        segment_ids=segment_ids,
        q_offset=q_offset,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths,
    )
    if plan.native_backward and not want_dbias:
        dq, dk, dv = flash_mosaic_bwd.backward(
            plan.bwd_st, query, key, value, bias, mask, bounds, segment_ids, out, lse, d_out,
            d_lse, values_flagged=values_flagged and plan.st.clean_hidden,
        )  # fmt: skip
        return dq, dk, dv, None
    return flash_triton.backward(
        query, key, value, bias, mask, out, lse, d_out, d_lse, want_dbias=want_dbias,
        interpret=plan.st.interpret, **options,
    )  # fmt: skip


def _backward_static(
    st: Static, config: MosaicConfig, head_dim: int, pair_itemsize: int, kv_len: int, lengths: bool
) -> tuple[Static, bool]:
    """(the backward kernels' Static, whether they serve this call). The backward tiles both
    axes by 2 * max(bwd blocks): its own padding, its own kv check (also with key lengths). It
    needs its buffers in shared memory and its accumulators in registers (above H = 128 only
    with bwd_head_split: its dk/dv kernel splits dK and dV by columns over the two consumers;
    a float32 bias tile at H = 256 still overflows shared memory then)."""
    bwd_tile = 2 * max(config.bwd_block_q, config.bwd_block_kv)
    bwd_st = dataclasses.replace(
        st,
        block_q=config.bwd_block_q,
        block_kv=config.bwd_block_kv,
        num_stages=config.bwd_num_stages,
        dkdv_stages=config.bwd_dkdv_stages or config.bwd_num_stages,
        check_kv_len=lengths or kv_len % bwd_tile != 0,
        persistent=False,
        longest_first=config.longest_first and BACKWARD_LONGEST_FIRST,
        early_k_wait=False,
        named_barrier=False,
        o_buffer=False,
        softmax_overlap=False,
        head_parts=backward_head_parts(config, head_dim),
        fused_dq=config.bwd_fused_dq,
        flex_blocks=False,
        # the dq kernel's redo: a ring slot per consumer; not with fused_dq (no dq kernel)
        redo_hidden=bool(config.bwd_redo_hidden)
        and st.clean_hidden
        and st.flex is None
        and config.bwd_num_stages >= CONSUMERS
        and not config.bwd_fused_dq,
    )
    native = st.interpret or (
        fits_shared_memory(backward_shared_memory_estimate(config, head_dim, pair_itemsize))
        and fits_registers(backward_register_tiles(config, head_dim))
    )
    return bwd_st, native


def _check_served(query: Array) -> None:
    """NotImplementedError for inputs this kernel does not serve: float32/float64 (the Triton
    kernel serves float32) and H > 256."""
    if query.dtype not in _DTYPES:
        raise NotImplementedError(
            f"the Mosaic GPU kernel serves float16/bfloat16, not {query.dtype} "
            "(float32 runs on the Triton kernel)"
        )
    if query.shape[-1] > 256:
        raise NotImplementedError(
            f"the Mosaic GPU kernel serves head dims up to 256, got {query.shape[-1]}"
        )


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


# --- jattn.flex_attention: the user's mods in the forward, the Triton kernels' backward ---------


def flex_attention(
    query: Array,  # [B, T, N, H] float16/bfloat16
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    flex,  # flash_triton.FlexSpec whose mods close over no arrays (`vectors` instead)
    blocks: tuple[Array, ...],  # () or a BlockMask's (kv_blocks, q_blocks)
    *,
    vectors: tuple[Array, Array] | None = None,  # flex.vectors: [B, T], [B, S] int32
    scale: float,
    config: MosaicConfig | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array]:  # out [B, T, N, H], lse [B, T, N] float32
    """`jattn.flex_attention` on this kernel: the score_mod and mask_mod traced into the
    forward's tiles (over index vectors, `mod_tiles.over_tile`), a block mask's lists
    read from shared memory (its empty blocks never loaded, its full ones without mask
    arithmetic). Gradients from this kernel's backward with the mods traced into its tiles
    (score_mod's derivative by jax.jvp of the tile function) and a block mask's lists: the dq
    kernel's per query block (BlockMask.kv_blocks), the dk/dv kernel's per key block
    (.q_blocks); from the Triton kernels' flex backward (`flash_triton.flex_backward`) where
    the blocks do not fit its programs (`flash_mosaic_bwd.block_mask_fits`) or its buffers do
    not fit the GPU.

    `vectors`: the per-query-row and per-key values the mods take where `flex.vectors`
    (what they read of closed-over arrays, `jattn.flex._mosaic_vectors`), streamed as the
    segment ids are.

    Raises NotImplementedError for mods that close over arrays (jattn.flex turns the reads it
    can into `vectors`; the Triton path reads the rest) or use a primitive Mosaic GPU does not
    lower (`mosaic_common.flex_unlowered`: log1p, jax.nn's custom_jvp functions), float32 /
    float64, H > 256, and block-mask blocks other than 128 query rows by a multiple of 64 keys
    (a program's 2 x 64 rows and its key tile)."""
    _check_served(query)
    batch, q_len, num_heads, head_dim = query.shape
    kv_len = key.shape[1]
    if config is not None and not isinstance(config, MosaicConfig):
        raise ValueError(f"mosaic needs a MosaicConfig, got {type(config).__name__}")
    if flex.vectors != (vectors is not None):
        raise ValueError(f"flex.vectors is {flex.vectors} but vectors given: {vectors is not None}")
    if flex.const_shapes:
        raise NotImplementedError(
            "the Mosaic GPU kernel's flex path serves mods that close over no arrays; "
            f"these close over {len(flex.const_shapes)} (use implementation='triton')"
        )
    unlowered = mosaic_common.flex_unlowered(flex)
    if unlowered:
        raise NotImplementedError(
            f"the mods use {sorted(unlowered)}, which Mosaic GPU does not lower "
            "(use implementation='triton')"
        )
    if config is None:
        config = default_config(head_dim, causal=False)
    if flex.block_mask is not None:
        block_q, block_kv = flex.block_mask
        if block_q != CONSUMERS * 64 or block_kv % 64:
            raise NotImplementedError(
                f"the Mosaic GPU kernel visits a block mask by programs of {CONSUMERS * 64} "
                f"query rows and key tiles of a multiple of 64: got blocks {flex.block_mask} "
                "(create_block_mask(block_q=128, block_kv=128), or use 'triton')"
            )
        config = dataclasses.replace(config, block_q=64, block_kv=block_kv)
    while config.num_stages > 1 and not fits_shared_memory(  # fixed tiles: shed stages
        shared_memory_estimate(config, head_dim, 0)
    ):
        config = dataclasses.replace(config, num_stages=config.num_stages - 1)
    interpret = common.interpret_mode() if interpret is None else interpret
    if not fits_shared_memory(shared_memory_estimate(config, head_dim, 0)) and not interpret:
        raise NotImplementedError(f"{config} does not fit shared memory at head dim {head_dim}")
    s_pad = -(-kv_len // config.block_kv) * config.block_kv
    has_blocks = flex.block_mask is not None
    st = Static(
        scale=float(scale),
        softcap=None,
        right=None,
        left=None,
        check_q_len=False,  # padding rows are computed and dropped
        check_kv_len=s_pad != kv_len,
        dense_masks=flex.mask_mod is not None and not has_blocks,
        has_bias=False,
        has_mask=False,
        has_segments=flex.vectors,
        groups=num_heads // key.shape[2],
        # not redo_hidden: a score_mod may make padded query rows non-finite (every call redone)
        **_schedule(dataclasses.replace(config, persistent=False, redo_hidden=False), interpret),
        flex=flex,
        flex_index_bound=max(q_len, kv_len),
        flex_blocks=has_blocks,
    )
    st = _with_cleaning(st)
    bounds = _bounds(batch, q_len, kv_len, None, None, None)
    visits = fwd_visits = None
    if has_blocks:
        visits = _visit_lists(blocks[0])
        fwd_visits = _visit_lists(blocks[0], forward=True, longest_first=st.longest_first)
    # The backward: this kernel's, with the mods traced into its dq and dk/dv tiles and a block
    # mask's lists read as in the forward (a dq program's 128 rows are one block's), where it
    # fits; else the Triton kernels' flex backward.
    if has_blocks:
        config = dataclasses.replace(config, bwd_block_q=64)
    bwd_st, native_backward = _backward_static(st, config, head_dim, 0, kv_len, False)
    if has_blocks:
        bwd_st = dataclasses.replace(bwd_st, flex_blocks=True)
        native_backward = native_backward and flash_mosaic_bwd.block_mask_fits(
            bwd_st, flex.block_mask
        )
    q_tile, kv_tile = flash_mosaic_bwd.padding_tiles(bwd_st)
    # Padded query rows are masked there: a score_mod may give their zero queries a logit that
    # overflows exp2, and inf * (dO = 0) would reach dK and dV.
    bwd_st = dataclasses.replace(
        bwd_st, check_q_len=q_len % q_tile != 0, check_kv_len=kv_len % kv_tile != 0
    )
    q_visits = _visit_lists(blocks[1]) if has_blocks else None
    if flex.vectors and not native_backward:  # the Triton backward takes the arrays themselves
        raise NotImplementedError(
            "the Mosaic GPU backward does not serve this block mask or head dim, and its Triton "
            "fallback reads closed-over arrays itself (use implementation='triton')"
        )

    lists = (fwd_visits, visits, q_visits)

    @jax.custom_vjp
    def attention(query, key, value, bounds, lists, blocks, vectors):
        return forward(st, query, key, value, None, None, bounds, vectors, lists[0])

    def forward_rule(query, key, value, bounds, lists, blocks, vectors):
        out, lse = forward(st, query, key, value, None, None, bounds, vectors, lists[0])
        return (out, lse), (query, key, value, out, lse, bounds, lists, blocks, vectors)

    def backward_rule(residuals, cotangents):
        query, key, value, out, lse, bounds, lists, blocks, vectors = residuals
        _, visits, q_visits = lists
        d_out, d_lse = cotangents
        no_cotangent = jax.tree.map(lambda _: None, (bounds, lists, blocks, vectors))
        if native_backward:
            dq, dk, dv = flash_mosaic_bwd.backward(
                bwd_st, query, key, value, None, None, bounds, vectors, out, lse, d_out, d_lse,
                visits=(visits, q_visits) if has_blocks else None,
            )  # fmt: skip
            return dq, dk, dv, *no_cotangent
        dq, dk, dv = flash_triton.flex_backward(
            query,
            key,
            value,
            flex,
            blocks,
            out,
            lse,
            d_out,
            d_lse,
            scale=scale,
            interpret=interpret,
        )
        return dq, dk, dv, *no_cotangent

    attention.defvjp(forward_rule, backward_rule)
    return attention(query, key, value, bounds, lists, tuple(blocks), vectors)


def _visit_lists(kv_blocks: Array, *, forward: bool = False, longest_first: bool = False):
    """A BlockMask's [B', N', QB, 2 + 2 KB] lists ([n_partial, n_full, partial ids, full ids])
    -> [B', N', QB, L]: [n_partial + n_full, n_partial, partial ids then full ids, 0...], L the
    next multiple of 32 of the row (a TMA copy moves multiples of 128 bytes).

    forward: the forward kernel's rows, [n, n_partial, the query block, ids...], which the
    kernel reads in place of its grid position, so that the rows may be reordered:
    longest_first sorts them by n, descending (the query blocks that visit the most key blocks
    start first and the short ones fill the tail, as `MosaicConfig.longest_first` orders a
    causal forward)."""
    n_partial, n_full = kv_blocks[..., 0:1], kv_blocks[..., 1:2]
    num_blocks = (kv_blocks.shape[-1] - 2) // 2
    partial, full = kv_blocks[..., 2 : 2 + num_blocks], kv_blocks[..., 2 + num_blocks :]
    j = lax.broadcasted_iota(jnp.int32, partial.shape, partial.ndim - 1)
    from_full = jnp.take_along_axis(full, jnp.clip(j - n_partial, 0, num_blocks - 1), axis=-1)
    ids = jnp.where(j < n_partial, partial, from_full)
    head = [n_partial + n_full, n_partial]
    if forward:
        head.append(lax.broadcasted_iota(jnp.int32, n_partial.shape, n_partial.ndim - 2))
    lists = jnp.concatenate([*head, ids], axis=-1).astype(jnp.int32)  # [B', N', QB, row]
    if longest_first:
        order = jnp.argsort(-lists[..., 0], axis=-1, stable=True)  # [B', N', QB]
        lists = jnp.take_along_axis(lists, order[..., None], axis=-2)
    width = -(-lists.shape[-1] // 32) * 32
    return common.pad_last(lists, width)
