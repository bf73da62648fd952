"""One AD-CAM call through the Triton kernels, for a profiler (Nsight Compute or Systems).

Attention of one of bench/merge_model.py's kinds (``--kind``, default ``random``; fp32) and
maps at one (N, B), default configs (``ADCAM_AUTOTUNE=0``: no candidate launches in the
profile), one warm-up call (compiles) and then ``--calls`` profiled ones, between
``cudaProfilerStart`` and ``cudaProfilerStop``, so that a profiler that starts there
profiles them alone, however many launches a call makes. bench/gpu_check.sh runs it under
``ncu`` when the machine has it:

    ncu --profile-from-start off -k regex:'topk|diffusion' \
        python bench/profile_kernels.py --n 576 --b 128

``--topk-config FIELD=VALUE,...`` profiles the similarity stage alone instead (the sqrt
pass, the top-k kernel and, in parts, `merge_parts_kernel`) under that config (the form
that bench/kernels.py takes; ``ws=1`` runs on Hopper only).
``--host-profile`` runs the profiled calls under cProfile instead, the device idle at each
call, and prints where the host's part of a call goes (its functions by own time and by
cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
from contextlib import nullcontext

import torch
from configs import topk_config
from merge_model import KINDS, attention

from adcam_fast.kernels import adcam_triton
from adcam_fast.kernels.coneighbor_topk import refine_sparse
from adcam_fast.kernels.launch import next_pow2
from adcam_fast.reference import EPS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=576)
    p.add_argument("--b", type=int, default=128)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--kind", choices=KINDS, default="random", help="attention (merge_model)")
    p.add_argument("--topk-config", metavar="FIELD=VALUE,...",
                   help="the similarity stage alone, under this top-k config")  # fmt: skip
    p.add_argument("--host-profile", action="store_true", help="cProfile the calls' host work")
    args = p.parse_args()
    os.environ["ADCAM_AUTOTUNE"] = "0"  # the default configs: no candidates in the profile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = topk_config(args.topk_config, next_pow2(args.k)) if args.topk_config else None
    gen = torch.Generator(device=device).manual_seed(0)
    A = attention(args.b, args.n, args.kind, gen, torch.float32)
    cams = torch.rand(args.b, args.classes, args.n, generator=gen, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def call() -> None:
        if config:
            refine_sparse(A, args.k, EPS, torch.int32, config=config)
        else:
            adcam_triton(A, cams, args.k, args.steps)

    call()  # compiles
    sync()
    profile = cProfile.Profile() if args.host_profile else None
    with torch.cuda.profiler.profile() if device == "cuda" else nullcontext():
        for _ in range(args.calls):
            if profile:
                profile.enable()
            call()
            if profile:
                profile.disable()
            sync()
    if profile:
        stats = pstats.Stats(profile).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
    print(f"{1 + args.calls} calls at N={args.n}, B={args.b} ({args.kind}) on {device}")


if __name__ == "__main__":
    main()
