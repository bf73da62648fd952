"""Merges per row block of each top-k merge schedule of kernels 1+2, counted on the CPU.

A float64 model of the schedule of ``coneighbor_topk_kernel`` (no Triton). Per block of
``BLOCK_M`` rows, the column tiles in the kernel's order (its diagonal tile first; with
``--parts``, each program's run of them, from the diagonal tile in the run that holds it) and

- whole tiles (slots 0): one merge for every tile that holds a key above some row's k-th
  best so far;
- parked (slots > 0): the keys above a row's k-th best are parked; before a tile that
  could overflow a row's slots, and at the end, the parked keys are merged ``width`` at a
  time (``ceil(most parked in a row / width)`` merges).

Each merge runs the same bitonic network over a (BLOCK_M, width) block, so merges per
program predict the merge work of a schedule. For whole tiles it also prints the share of
merges in which no row of the block has more than ``--narrow`` candidates (the merges the
narrow schedule, ``narrow`` in `topk_configs`, takes instead) and the mean of that most
per row over them (the passes it makes). Attention: the kinds of `attention`, which
bench/kernels.py times too. Prints one line per case.

    python bench/merge_model.py [--sizes 576 2304] [--k 50] [--slots 0 128 256] [--narrow 16]
"""

from __future__ import annotations

import argparse
import math

import torch

from adcam_fast.kernels.launch import next_pow2

KINDS = ("random", "spatial", "blocks")
BLOCK = 128
"""The width of the ``blocks`` kind's diagonal blocks: the widest S tile of the kernels."""


def attention(
    b: int, n: int, kind: str, gen: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(B, N, N) row-stochastic attention of one kind, on ``gen``'s device:

    - ``random``: softmax of 3 × normal noise (the kernel benchmark's default);
    - ``spatial``: tokens on a square grid (N a square) attending to their neighbours and
      to their own side of a square object's border, plus noise;
    - ``blocks``: uniform within aligned diagonal blocks of ``BLOCK`` tokens, zero outside.
      Every S entry of a row's block is equal and above the rest, so a row's k best all lie
      in its first (diagonal) tile: the merge floor, a single merge per program for tiles
      of ``BLOCK`` columns.
    """
    device = gen.device
    if kind == "blocks":
        block = torch.arange(n, device=device) // BLOCK
        same = (block[:, None] == block[None, :]).to(dtype)
        return (same / same.sum(-1, keepdim=True)).expand(b, n, n).contiguous()
    noise = torch.randn(b, n, n, generator=gen, device=device, dtype=dtype)
    if kind == "random":
        return noise.mul_(3).softmax(-1)  # in place: at B = 128, N = 4096, 8.6 GB each
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"spatial attention needs a square number of tokens, got N={n}")
    grid = torch.arange(side, device=device, dtype=dtype)
    yx = torch.stack(torch.meshgrid(grid, grid, indexing="ij")).reshape(2, -1).T
    inside = ((yx - side / 2).abs() < side / 4).all(-1)
    same = (inside[:, None] == inside[None, :]).to(dtype)
    return noise.mul_(0.5).add_(2 * same - (torch.cdist(yx, yx) / 3) ** 2).softmax(-1)


def walks(n: int, block_m: int, block_n: int, parts: int = 1):
    """(first row, column tiles in order) of each program: a row block's tiles in ``parts``
    runs, each from the diagonal tile if the run holds it, wrapping around."""
    tiles = -(-n // block_n)
    for m0 in range(0, n, block_m):
        diag = m0 // block_n
        for part in range(parts):
            run = list(range(part * tiles // parts, (part + 1) * tiles // parts))
            start = run.index(diag) if diag in run else 0
            yield m0, run[start:] + run[:start]


def merges(
    S: torch.Tensor, k: int, block_m: int, block_n: int, slots: int, parts: int = 1
) -> tuple[float, list[int]]:
    """Mean merges per row block (over its ``parts`` programs) of one schedule over S
    (N, N), and for whole tiles, per merge, the most candidates any row of the block
    brought."""
    n, kp = S.shape[0], next_pow2(k)
    width = max(block_n, kp)
    total, most_new = 0, []
    for m0, order in walks(n, block_m, block_n, parts):
        rows = S[m0 : m0 + block_m]
        best = torch.full((rows.shape[0], kp), -math.inf, dtype=S.dtype)  # running top kp
        parked = rows[:, :0]
        for t in range(len(order) + 1):
            most = parked.isfinite().sum(1).max().item() if slots else 0  # most parked in a row
            if slots and (t == len(order) or most > slots - block_n):
                total += math.ceil(most / width)
                best = torch.cat([best, parked], 1).topk(kp, 1).values
                parked = rows[:, :0]
            if t == len(order):
                break
            tile = rows[:, order[t] * block_n : (order[t] + 1) * block_n]
            new = tile > best[:, k - 1 : k]
            if not slots:
                if new.any():
                    total += 1
                    most_new.append(int(new.sum(1).max()))
                    best = torch.cat([best, tile], 1).topk(kp, 1).values
            else:
                parked = torch.cat([parked, tile.masked_fill(~new, -math.inf)], 1)
    return total / -(-n // block_m), most_new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[576, 2304])
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--slots", type=int, nargs="+", default=[0, 128, 256])
    p.add_argument("--block-m", type=int, default=64)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--narrow", type=int, default=16, help="candidates per row of a narrow merge")
    p.add_argument("--parts", type=int, default=1, help="programs per row block (config parts)")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    for n in args.sizes:
        for kind in KINDS:
            R = attention(1, n, kind, gen)[0].sqrt()
            S = R @ R.T
            counts = {
                s: merges(S, args.k, args.block_m, args.block_n, s, args.parts) for s in args.slots
            }
            shown = ", ".join(f"slots {s}: {c:.1f}" for s, (c, _) in counts.items())
            line = (f"N={n} k={args.k} {kind}: {-(-n // args.block_n)} tiles in {args.parts} "
                    f"part(s); merges/row block {shown}")  # fmt: skip
            if 0 in counts:
                most = counts[0][1]
                few = [m for m in most if m <= args.narrow]
                line += (
                    f"; whole-tile merges with <= {args.narrow} per row: "
                    f"{len(few) / max(len(most), 1):.0%}, at most {sum(few) / max(len(few), 1):.1f}"
                    " per row on average"
                )
            print(line)


if __name__ == "__main__":
    main()
