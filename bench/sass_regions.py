"""Where each kernel's warps spend their time, by code region, from Nsight Compute's source
page (the CSV that bench/gpu_check.sh writes as sass.log; gzipped is fine):

    python bench/sass_regions.py bench/results/gpu7/sass.log.gz

A region is the set of SASS instructions executed equally often: in the top-k kernel, once
per program (the epilogue), once per tile (keys and merges) and once per K step (the dot
loop). For each region, in order of its share of the warp-state samples (a sample is a warp
seen at an instruction, so a share is a share of warp time): how often a warp runs it
(executions over those of the kernel's first instruction, once per warp), its instruction
sites, its executed warp instructions, and its three main stall reasons.
"""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def kernels(lines: Iterable[str]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Each kernel's name and its instructions (one dict per SASS line, by column name)."""
    name, header, rows = None, None, []
    for row in csv.reader(lines):
        if len(row) >= 2 and row[0] == "Kernel Name":
            if name and rows:
                yield name, rows
            name, header, rows = row[1], None, []
        elif row[:1] == ["Address"]:
            header = row
        elif name and header and len(row) == len(header):
            rows.append(dict(zip(header, row, strict=True)))
    if name and rows:
        yield name, rows


def regions(rows: list[dict[str, str]]) -> list[dict]:
    """The rows grouped by execution count, the largest share of samples first."""
    per_warp = int(rows[0][EXECUTED]) or 1
    stalls = [c for c in rows[0] if c.startswith("stall_") and "(Not Issued)" not in c]
    groups: dict[int, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[int(row[EXECUTED])].append(row)
    total = sum(int(row[SAMPLES]) for row in rows) or 1
    out = []
    for executed, group in groups.items():
        reasons = Counter({c: sum(int(r[c] or 0) for r in group) for c in stalls})
        samples = sum(int(r[SAMPLES]) for r in group)
        out.append(
            dict(
                per_warp=executed / per_warp,
                sites=len(group),
                warp_instructions=executed * len(group),
                share=samples / total,
                stalls=[(c.removeprefix("stall_"), n) for c, n in reasons.most_common(3) if n],
            )
        )
    return sorted(out, key=lambda r: -r["share"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path, help="Nsight Compute's source page as CSV (.gz or not)")
    p.add_argument("--top", type=int, default=6, help="regions per kernel")
    args = p.parse_args()
    opener = gzip.open if args.log.suffix == ".gz" else open
    with opener(args.log, "rt", newline="") as f:
        for name, rows in kernels(f):
            print(name)
            for r in regions(rows)[: args.top]:
                reasons = ", ".join(f"{c} {n}" for c, n in r["stalls"])
                print(
                    f"  {r['share']:6.1%} of samples: {r['per_warp']:g} per warp, "
                    f"{r['sites']} sites, {r['warp_instructions']} warp instructions; {reasons}"
                )


if __name__ == "__main__":
    main()
