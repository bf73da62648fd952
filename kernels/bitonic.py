"""The sorting network of the running top-k: bitonic merges over the rows of int32 keys.

Every function takes a block of keys, (M, W) with W a power of two, and works on each row
independently and in registers (a step whose distance selects lanes exchanges them). Keys
are distinct where it matters (`coneighbor_topk`'s rule), so every order below is total and
the kept set does not depend on the order in which tiles are merged. A running list is the
row's top ``KP = 2**LOG_KP`` keys sorted ascending, -1 while unfilled: `merge_tile` folds a
tile of keys into it, `merge_largest` the few largest of a tile, and `kth_key` reads the
bar that a key must pass to enter.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _partner(x, DIST: tl.constexpr):
    """x (M, W) with columns c and ``c ^ DIST`` swapped: each entry's partner read as ``pair
    sum - self`` (a size-2 ``tl.sum``: in registers, or one lane exchange where the bit of
    DIST selects lanes); int32 arithmetic wraps around, so this is exact for any keys."""
    M: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    h = tl.reshape(x, (M, W // (2 * DIST), 2, DIST))
    return tl.reshape(tl.sum(h, axis=2, keep_dims=True) - h, (M, W))


@triton.jit
def _in_order(x, y, DIST: tl.constexpr, DIR_BIT: tl.constexpr, FLIP: tl.constexpr):
    """Each entry of x (M, W) put in order with its partner y: column c keeps the larger of
    the two where ``(c & DIST != 0) != ((c & DIR_BIT != 0) != FLIP)``, the smaller elsewhere
    (pairs ascending from left to right, descending where the DIR_BIT bit is flipped)."""
    c = tl.arange(0, x.shape[1])
    if DIR_BIT == 0:  # one direction (fewer operations for the interpreter)
        swap_to_right = ((c & DIST) != 0) != FLIP
    else:
        swap_to_right = ((c & DIST) != 0) != (((c & DIR_BIT) != 0) != FLIP)
    return tl.where((x > y) != swap_to_right[None, :], y, x)


@triton.jit
def _compare_swap(x, DIST: tl.constexpr, DIR_BIT: tl.constexpr, FLIP: tl.constexpr):
    """One bitonic step on each row of x (M, W): columns c and c + DIST (c & DIST == 0) are
    put in order, descending where ``(c & DIR_BIT != 0) != FLIP``, ascending elsewhere."""
    return _in_order(x, _partner(x, DIST), DIST, DIR_BIT, FLIP)


@triton.jit
def bitonic_merge(x, LOG_RUN: tl.constexpr, DIR_BIT: tl.constexpr, FLIP: tl.constexpr):
    """Sort each bitonic run of ``2**LOG_RUN`` columns (direction as in `_compare_swap`)."""
    for j in tl.static_range(LOG_RUN):
        x = _compare_swap(x, 1 << (LOG_RUN - 1 - j), DIR_BIT, FLIP)
    return x


@triton.jit
def _merge_halves(x, LOG_RUN: tl.constexpr, DIR_BIT: tl.constexpr, FLIP: tl.constexpr):
    """Sort each run of ``R = 2**LOG_RUN`` columns whose two halves are sorted the same way
    (direction as in `_compare_swap`). First place p of a run is put in order with place
    ``R - 1 - p`` (its mirror image ``p ^ (R - 1)``: a `_partner` step per bit, each free
    in registers and one lane exchange where the bit selects lanes); each half is then
    bitonic, with all of one half on the right side of the other, and `bitonic_merge`
    sorts the halves."""
    y = x
    for i in tl.static_range(LOG_RUN):
        y = _partner(y, 1 << i)
    x = _in_order(x, y, 1 << (LOG_RUN - 1), DIR_BIT, FLIP)
    return bitonic_merge(x, LOG_RUN - 1, DIR_BIT, FLIP)


@triton.jit
def topk_desc(x, LOG_K: tl.constexpr, LOG_W: tl.constexpr, ROW_WARPS: tl.constexpr):
    """The ``2**LOG_K`` largest entries of each row of x (M, 2**LOG_W), sorted descending.

    Bitonic top-k: sort runs of 2**LOG_K, descending and ascending in turn, then repeatedly
    take the element-wise max of neighbouring runs (a descending and an ascending run keep
    the larger half of both, as a bitonic run) and re-sort, halving the width to 2**LOG_K.
    Two choices depend on how the tile's warps share it (``ROW_WARPS``: warps split the
    rows, at least 16 rows a warp, as in the wgmma tiles of kp <= 64; else a row's columns,
    as in the kp >= 128 tiles). Counts are sm_90a SASS instructions in the kernel (Triton
    3.6, fp32). With ROW_WARPS, a run is sorted by merging its sorted halves
    (`_merge_halves`), every merge ascending but the last, so that only one column bit
    (2**LOG_K, between runs) sets a direction: where a direction bit selects lanes, each
    compare-exchange is a compare and a select per entry instead of one min or max (64×128
    tile on 4 warps: 4592 instead of 5048 with directions alternating at every size of run,
    for 64 more lane shuffles). Without it, runs are sorted by bitonic merges whose
    direction alternates with each size: there a mirror step would exchange entries across
    warps once per warp bit, through shared memory (kp = 128 and 256: 26 and 28 % more
    instructions).
    With ROW_WARPS, the columns are also relabelled first (any order will do): in the wgmma
    tiles, bits 1-2 of a column index select the lane within a quad, which made the
    network's distance-2 and -4 stages, the most frequent, lane shuffles. Moved to just
    below the top bit, they leave those stages to register pairs within a thread (64×128
    tile: 391 lane shuffles and 4592 instructions, against 1159 and 5736 unmoved; at the
    very top, 5368). Where warps split a row's columns it costs more than it saves at
    kp = 128 (4128 instructions without it, 4632 with) and 256 (4856 and 5336), so there
    it is left out; not at kp = 1024, where it stays: without it the default build takes
    255 registers instead of 128 (for 24888 instructions instead of 28056 and 2412 bytes
    of spills instead of 3172) and the parked one spills more (3180 bytes against 2924).
    None of these was timed on a GPU.
    """
    K: tl.constexpr = 1 << LOG_K
    M: tl.constexpr = x.shape[0]
    W: tl.constexpr = 1 << LOG_W
    if (ROW_WARPS or LOG_K >= 10) and W >= 16:  # bits 1-2 to just below the top: see above
        x = tl.reshape(tl.permute(tl.reshape(x, (M, 2, W // 16, 4, 2)), (0, 1, 3, 2, 4)), (M, W))
    for s in tl.static_range(1, LOG_K + 1):
        if ROW_WARPS:
            x = _merge_halves(x, s, K if s == LOG_K else 0, s == LOG_K)
        else:
            x = bitonic_merge(x, s, 1 << s, True)
    for level in tl.static_range(LOG_W - LOG_K):
        half = tl.reshape(x, (M, (1 << (LOG_W - level - 1)) // K, 2, K))
        x = tl.reshape(tl.max(half, axis=2), (M, 1 << (LOG_W - level - 1)))
        if LOG_K > 0:  # the same values in the layout a reshape gives, as `_partner`'s are:
            # Gluon 3.9 takes the max's (a slice of a 4D layout) for another and will not
            # compare the two (no change to the Triton builds of 3.6 and 3.8)
            x = tl.reshape(tl.reshape(x, (M, x.shape[1] // 2, 2)), (M, x.shape[1]))
        x = bitonic_merge(x, LOG_K, K, True)
    return x


@triton.jit
def merge_tile(acc, x, LOG_KP: tl.constexpr, LOG_W: tl.constexpr, ROW_WARPS: tl.constexpr):
    """The KP largest keys of ``acc ∪ x`` per row, sorted ascending (acc: (M, KP) ascending;
    x: (M, 2**LOG_W), any order, W >= KP)."""
    top = topk_desc(x, LOG_KP, LOG_W, ROW_WARPS)
    return bitonic_merge(tl.maximum(acc, top), LOG_KP, 0, False)


@triton.jit
def merge_largest(acc, x, count, LOG_KP: tl.constexpr):
    """`merge_tile` of the ``count`` (<= KP) largest keys of each row of x (M, W): distinct keys
    >= 0, -1 elsewhere. They are taken one at a time, largest first, as a descending list
    met place by place with the ascending acc. A pass finds the largest key below the
    last one taken, m, as ``m - 1 - min(m - 1 - x)`` with the differences read unsigned
    (keys >= m wrap to the top): about two instructions per key of x, where `merge_tile` over
    the same tile spends about 48 (sm_90a SASS of a 64×128 tile on 4 warps: 145 per pass
    and 700 around the passes, against 3093 instructions per thread)."""
    KP: tl.constexpr = 1 << LOG_KP
    place = tl.arange(0, KP)
    top = tl.full(acc.shape, -1, tl.int32)
    m = tl.full((acc.shape[0],), 2**31 - 1, tl.int32)  # above every key
    for p in range(count):
        gap = tl.min((m[:, None] - 1 - x).to(tl.uint32, bitcast=True), axis=1)
        gap = gap.to(tl.int32, bitcast=True)  # < 0: no key below m (the row is spent)
        m = tl.where((m >= 0) & (gap >= 0), m - 1 - gap, -1)
        top = tl.where(place[None, :] == p, m[:, None], top)
    return bitonic_merge(tl.maximum(acc, top), LOG_KP, 0, False)


@triton.jit
def kth_key(acc, K_KEEP, KP: tl.constexpr):
    """The K_KEEP-th largest key of each row of the ascending list acc (-1 while unfilled)."""
    pick = tl.arange(0, KP) == KP - K_KEEP
    return tl.max(tl.where(pick[None, :], acc, -1), axis=1)
