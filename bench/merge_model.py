"""Merges per program of each top-k merge schedule of kernels 1+2, counted on the CPU.

A float64 model of the schedule of ``coneighbor_topk_kernel`` (no Triton). Per block of
``BLOCK_M`` rows, the column tiles in the kernel's order (its diagonal tile first) and

- whole tiles (slots 0): one merge for every tile that holds a key above some row's k-th
  best so far;
- parked (slots > 0): the keys above a row's k-th best are parked; before a tile that
  could overflow a row's slots, and at the end, the parked keys are merged ``width`` at a
  time (``ceil(most parked in a row / width)`` merges).

Each merge runs the same bitonic network over a (BLOCK_M, width) block, so merges per
program predict the merge work of a schedule. For whole tiles it also prints the share of
merges in which no row of the block has more than ``--narrow`` candidates (the merges the
narrow schedule, ``narrow`` in `topk_configs`, takes instead) and the mean of that most
per row over them (the passes it makes). Attention: softmax of scaled noise (as in
bench/kernels.py) and a spatial kind (tokens on a square grid attending to neighbours and
to their own side of a square object's border). Prints one line per case.

    python bench/merge_model.py [--sizes 576 2304] [--k 50] [--slots 0 128 256] [--narrow 16]
"""

from __future__ import annotations

import argparse
import math

import torch

from adcam_fast.kernels.launch import next_pow2


def attention(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """(N, N) row-stochastic attention, float64."""
    noise = torch.randn(n, n, generator=gen, dtype=torch.float64)
    if kind == "random":
        return (3 * noise).softmax(-1)
    side = math.isqrt(n)
    yx = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    yx = yx.reshape(2, -1).T.double()
    inside = ((yx - side / 2).abs() < side / 4).all(-1)
    same = (inside[:, None] == inside[None, :]).double()
    return (-((torch.cdist(yx, yx) / 3) ** 2) + 2 * same + 0.5 * noise).softmax(-1)


def merges(
    S: torch.Tensor, k: int, block_m: int, block_n: int, slots: int
) -> tuple[float, list[int]]:
    """Mean merges per program of one schedule over the row blocks of S (N, N), and for
    whole tiles, per merge, the most candidates any row of the block brought."""
    n, kp = S.shape[0], next_pow2(k)
    width = max(block_n, kp)
    tiles = -(-n // block_n)
    total, most_new = 0, []
    for m0 in range(0, n, block_m):
        rows = S[m0 : m0 + block_m]
        best = torch.full((rows.shape[0], kp), -math.inf, dtype=S.dtype)  # running top kp
        parked = rows[:, :0]
        first = m0 // block_n
        for t in range(tiles + 1):
            most = parked.isfinite().sum(1).max().item() if slots else 0  # most parked in a row
            if slots and (t == tiles or most > slots - block_n):
                total += math.ceil(most / width)
                best = torch.cat([best, parked], 1).topk(kp, 1).values
                parked = rows[:, :0]
            if t == tiles:
                break
            c0 = (first + t) % tiles * block_n
            tile = rows[:, c0 : c0 + block_n]
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
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    for n in args.sizes:
        for kind in ("random", "spatial"):
            R = attention(n, kind, gen).sqrt()
            S = R @ R.T
            counts = {s: merges(S, args.k, args.block_m, args.block_n, s) for s in args.slots}
            shown = ", ".join(f"slots {s}: {c:.1f}" for s, (c, _) in counts.items())
            line = f"N={n} k={args.k} {kind}: {-(-n // args.block_n)} tiles; merges/program {shown}"
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
