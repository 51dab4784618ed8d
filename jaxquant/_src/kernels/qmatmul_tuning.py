"""How the Hopper qmatmul kernel tiles a problem, and every threshold ``auto`` decides by.

Terms as in ``qmatmul_mgpu``: a *tile* is 64 output features (the wgmma M side) by up to
``token_tile`` tokens, per warpgroup; a *step* is ``tile_k`` elements of K streamed through shared
memory; *split-K* runs one output tile as several CTAs over parts of K, whose float32 partial
sums XLA adds. Each tuned number says why it is what it is and names the file under
``experiments/results/`` that measured it (H100, JAX 0.11.2, NF4 + double quant, block 64, whole
call, CUPTI). Re-measure block sizes with ``experiments/sweep_qmatmul_gpu.py`` and auto's choices
with ``experiments/bench_qmatmul.py``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jaxquant._src.kernels import platform

TILE_N = 64  # output features per warpgroup: the wgmma M dimension
MAX_TOKENS = 128  # tokens per CTA by default, on the wgmma N side (a multiple of 8, <= 256)
TABLE_COPIES = (0, 4, 8, 16, 32)  # byte-pair table copies the kernel can build (16-byte rows)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """How the kernel tiles one call. ``BlockSizes()`` means "pick for the problem": the preset
    for the number of tokens (``preset_for``); any other value is used as given, with its steps
    and stages fitted to shared memory (``for_problem``). An experiment that wants exactly its
    sizes subclasses this and overrides ``for_problem``.

    Attributes:
      tile_k: elements of K per pipeline step (``tile_k / 8`` int32 code words per row).
      max_concurrent_steps: pipeline stages, at most; fewer where their buffers pass the budget.
      k_splits: CTAs per output tile along K (split-K); None: enough to fill the GPU.
      target_ctas: the CTA count split-K aims at; None: 528 (4 per SM) up to 32 tokens, else 256.
      token_tile: tokens per CTA; more tokens run as several token tiles.
      compute_wgs: warpgroups per CTA sharing each x tile: 1 (a plain pipeline) or 2 (plus a
        third that issues the copies: warp specialization).
      table_copies: > 0: decode through a shared-memory byte-pair table with this many copies
        (one of ``TABLE_COPIES``); 0: by ``prmt`` lookups in registers (x permuted in XLA).
      persistent_ctas: > 0 (with two warpgroups and ``k_splits=1``): at most this many CTAs, each
        running several output tiles back to back as chained pipelines.
    """

    tile_k: int = 256
    max_concurrent_steps: int = 4
    k_splits: int | None = None
    target_ctas: int | None = None
    token_tile: int = MAX_TOKENS
    compute_wgs: int = 1
    table_copies: int = 0
    persistent_ctas: int = 0

    def for_problem(self, m: int, k: int, n: int, block_size: int) -> BlockSizes:
        """The sizes a launch for ``m`` tokens and ``W[K, N]`` uses: the preset for ``m`` where
        these are the defaults, then steps and stages shrunk to fit shared memory."""
        bs = preset_for(m, n) if self == BlockSizes() else self
        tokens = token_tiling(m, bs)[0]
        return fit_stages(fit_tile_k(k, block_size, bs, tokens), tokens)


# ---------------------------------------------------------------- presets, by number of tokens

# Up to 64 tokens the register decode keeps the integer ALU busy (68% at 1 token): a shared-
# memory byte-pair table moves the work to the load/store unit. Its 32 KB fill per CTA pays with
# fewer, longer CTAs (~200) and 2 stages (3 CTAs per SM). 4096x14336 at 1 / 16 / 64 tokens:
# 19.3 / 20.2 / 25.6 us, 2.1x / 2.2x / 1.9x a bf16 dot (results/table_natural_h100.log).
FEW_TOKENS = BlockSizes(max_concurrent_steps=2, target_ctas=200, table_copies=32)
FEW_TOKENS_MAX = 64

# 65-128 tokens (and more where 256-token tiles make too few CTAs): two warpgroups on 128-token
# tiles sharing x and one 32-copy table, 3 stages, K split so that ~one CTA per SM runs (112 is
# 4096x14336's tile count unsplit). At 128 tokens 34.6 us at 4096x14336 against 42.8 with one
# warpgroup, 38.6 with 2 stages (results/mid_variants_3.log).
MID_TOKENS = BlockSizes(tile_k=128, max_concurrent_steps=3, token_tile=128, compute_wgs=2,
                        table_copies=32, target_ctas=112)
MID_TOKENS_MAX = 128

# Many tokens on a wide output: two warpgroups share 256-token x tiles (half the x traffic per
# weight row) and store their tiles in place, in halves (room for the 32-copy table). Short
# tiles run persistent, at most one CTA per SM: 4096x14336 at 2048 tokens 325.8 us against
# 350.2 with one CTA per tile (results/persistent_4.log).
MANY_TOKENS = BlockSizes(tile_k=128, max_concurrent_steps=2, k_splits=1, token_tile=256,
                         compute_wgs=2, table_copies=32, persistent_ctas=132)
# With fewer 256-token tiles than this the GPU is not filled and MID_TOKENS (split-K) is faster:
# 4096x4096 at 256 tokens 23.9 us against 28.0 (results/mid_variants_4.log).
MANY_TOKENS_MIN_CTAS = 100

# Past this many steps per tile a CTA per tile is as fast as a persistent CTA: the table fill
# and store it saves are ~1% of such a tile; at 14336x4096 (112 steps) persistent was 2% slower,
# 322.5 against 315.9 us at 2048 tokens (results/persistent_4.log).
PERSISTENT_MAX_STEPS = 64


def preset_for(m: int, n: int) -> BlockSizes:
    """The block sizes for ``m`` tokens and ``n`` output features (the defaults where ``n`` is
    not a multiple of the two-warpgroup tile)."""
    if m <= FEW_TOKENS_MAX:
        return FEW_TOKENS
    if n % (TILE_N * MANY_TOKENS.compute_wgs):
        return BlockSizes()
    if m <= MID_TOKENS_MAX:
        return MID_TOKENS
    token_tiles, weight_tiles = output_tiles(m, n, MANY_TOKENS)
    return MANY_TOKENS if token_tiles * weight_tiles >= MANY_TOKENS_MIN_CTAS else MID_TOKENS


# ---------------------------------------------------------------- fitting to shared memory

# Pipelined steps of a one-warpgroup CTA: 48 KB lets 4 CTAs share an SM's 228 KB; at 64 tokens
# 4 stages took 160 KB, one CTA per SM, 1.4x slower (results/kernel_v4_variants_h100.log).
STAGE_BUDGET = 48 * 1024
# A warp-specialized CTA has the SM to itself (registers): of the 227 KB a CTA may have, steps
# and decode table take up to 176 KB, the output tile (in halves: 32 KB at 256 tokens; float32
# split-K partials at 128 tokens: 64 KB, with shorter steps) the rest. A hardware budget.
WS_STAGE_BUDGET = 176 * 1024


def pad_tokens(m: int) -> int:
    """Tokens padded to a multiple of 8 (the wgmma N granularity)."""
    return -(-m // 8) * 8


def stage_budget(bs: BlockSizes) -> int:
    """Shared memory for the pipelined steps (and, with two warpgroups, less the table)."""
    if bs.compute_wgs == 1:
        return STAGE_BUDGET
    return WS_STAGE_BUDGET - bs.table_copies * 1024  # the byte-pair table: 1 KB per copy


def step_bytes(tile_k: int, tokens: int, compute_wgs: int = 1) -> int:
    """Shared memory of one step: the codes of the CTA's rows and the x tile."""
    return compute_wgs * TILE_N * tile_k // 2 + tokens * tile_k * 2


def fit_tile_k(k: int, block_size: int, bs: BlockSizes, tokens: int) -> BlockSizes:
    """Shorter steps for a K that the step does not divide (SmolLM2's 576, say), and for many
    tokens, so that one step (two with two warpgroups) fits the stage budget."""
    longest = bs.tile_k
    limit = stage_budget(bs) // (2 if bs.compute_wgs > 1 else 1)
    while longest > 64 and step_bytes(longest, tokens, bs.compute_wgs) > limit:
        longest //= 2
    for tile_k in (longest, 128, 64):
        if k % tile_k == 0 and (tile_k % block_size == 0 or block_size % tile_k == 0):
            return dataclasses.replace(bs, tile_k=tile_k)
    return bs


def fit_stages(bs: BlockSizes, tokens: int) -> BlockSizes:
    """Fewer pipeline stages (>= 2) where ``max_concurrent_steps`` of them pass the budget."""
    step = step_bytes(bs.tile_k, tokens, bs.compute_wgs)
    stages = max(2, min(bs.max_concurrent_steps, stage_budget(bs) // step))
    return dataclasses.replace(bs, max_concurrent_steps=stages)


# ---------------------------------------------------------------- the launch grid

def token_tiling(m: int, bs: BlockSizes) -> tuple[int, int]:
    """(tokens per CTA, tokens padded to a whole number of such tiles)."""
    tokens = min(pad_tokens(m), bs.token_tile)
    return tokens, -(-m // tokens) * tokens


def output_tiles(m: int, n: int, bs: BlockSizes) -> tuple[int, int]:
    """(token tiles, weight tiles): the CTA tiles of an (m tokens, n features) output."""
    tokens, m_pad = token_tiling(m, bs)
    return m_pad // tokens, n // (TILE_N * bs.compute_wgs)


def k_splits(k: int, tiles: int, tokens: int, bs: BlockSizes) -> int:
    """Ways to split K so that ``tiles`` output tiles of ``tokens`` tokens times the splits fill
    the GPU, >= 2 steps each; 1 where the tiles alone fill it. Each split writes float32 partial
    sums that XLA reads back, so past 32 tokens the target is 256 CTAs, not 528 (4 per SM): at 64
    tokens and more the sums cost more than fuller waves gain
    (results/kernel_tokens_splits_h100.log)."""
    if bs.k_splits:
        return bs.k_splits
    target = bs.target_ctas or (528 if tokens <= 32 else 256)
    steps, best = k // bs.tile_k, 1
    for s in range(1, steps // 2 + 1):
        if steps % s == 0 and tiles * s <= 2 * target:
            best = s
            if tiles * s >= target:
                break
    return best


def persistent_grid(tiles: int, steps: int, bs: BlockSizes, sm_count: int | None = None) -> int:
    """CTAs that share ``tiles`` output tiles of ``steps`` steps, the same number each, in as few
    rounds as ``persistent_ctas`` CTAs (at most one per SM of ``sm_count``, by default this
    process's GPU) would take: 896 tiles make 128 CTAs of 7. 0 (a CTA per tile) where that does not
    divide evenly, takes one round, the tiles are long, or the steps do not divide into the
    stages (the pipelines run on from tile to tile)."""
    if (not bs.persistent_ctas or steps > PERSISTENT_MAX_STEPS
            or steps % bs.max_concurrent_steps):
        return 0
    sms = sm_count if sm_count is not None else platform.hopper_sm_count()
    rounds = -(-tiles // min(bs.persistent_ctas, sms or bs.persistent_ctas))
    return tiles // rounds if rounds > 1 and tiles % rounds == 0 else 0


class Launch(NamedTuple):
    """One launch's grid, for fitted block sizes."""
    tokens: int  # tokens per CTA tile
    m_pad: int  # tokens padded to whole tiles
    tiles: tuple[int, int]  # (token tiles, weight tiles)
    splits: int  # ways K is split (1: none, the tile is stored in place)
    ctas: int  # persistent CTAs, 0 for one CTA per output tile


def launch(m: int, k: int, n: int, bs: BlockSizes) -> Launch:
    """The grid of a launch for ``m`` tokens and ``W[K, N]`` with the fitted sizes ``bs``."""
    tokens, m_pad = token_tiling(m, bs)
    tiles = output_tiles(m, n, bs)
    splits = k_splits(k, tiles[0] * tiles[1], tokens, bs)
    return Launch(tokens, m_pad, tiles, splits,
                  persistent_grid(tiles[0] * tiles[1], k // bs.tile_k, bs))


# ---------------------------------------------------------------- what auto runs

# The kernel up to this many tokens: at 2048 tokens it is 0.85-0.93x a bf16 dot against the XLA
# path's 0.84-0.86x (results/bench_qmatmul_h100_session10_final.log), and it never writes the
# bf16 weights out; past it the XLA path's cuBLAS gemm is the better bet.
AUTO_MAX_TOKENS = 2048
# The one-warpgroup split-K kernel (N not a multiple of 128, or the caller's sizes) up to this
# many tokens: past it, 4-5% slower than XLA at 512 tokens (results/bench_qmatmul_h100_session7.log).
AUTO_SPLIT_K_MAX_TOKENS = 256
# Small decode matmuls go to XLA: at 1-8 tokens on weights up to 1.2M elements (SmolLM2-135M's
# 576x1536) every call sits at its ~5 us latency floor and the XLA path was 0-13% faster; the
# kernel wins from 16 tokens or 4M weights (results/small_shapes_h100.log).
XLA_UP_TO_TOKENS = 8
XLA_UP_TO_WEIGHTS = 1_200_000
# The XLA path itself: from this many tokens it writes the dequantized weight out and runs one
# plain gemm; below, two dots on the even and odd halves of k, which XLA fuses better for few
# tokens. 4096x14336: M=16 0.39 -> 0.41x a bf16 dot, M=2048 0.62 -> 0.87x
# (results/xla_path_variants_h100.log).
MATERIALIZE_FROM_TOKENS = 16


def auto_uses_kernel(m: int, weights: int, bs: BlockSizes) -> bool:
    """Whether auto should run the kernel, with fitted sizes ``bs``, for ``m`` tokens and a
    weight of ``weights`` elements (else the XLA path)."""
    if m <= XLA_UP_TO_TOKENS and weights <= XLA_UP_TO_WEIGHTS:
        return False
    return m <= (AUTO_MAX_TOKENS if bs.compute_wgs > 1 else AUTO_SPLIT_K_MAX_TOKENS)
