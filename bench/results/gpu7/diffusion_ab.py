"""A/B of diffusion kernels in one run: v9 (d36395d), w1 (694ba42, kernels/diffusion.py), and
w1 + quad edge loads (scratch/diffusion_quads.py). Same inputs (a real refinement of random
attention), every candidate config of each, median ms by triton.testing.do_bench; checks the
maps are bitwise equal across versions (same BLOCK_E and G: same order of sums).

Kept as it was run on the H200 of `gpu7` (from the repository root, the two older versions
as scratch/diffusion_v9.py = `git show d36395d:kernels/diffusion.py` and
scratch/diffusion_quads.py, the quad loads of ddabf83 (the same SASS), the project
installed): ``ADCAM_AUTOTUNE=0 python scratch/ab_diffusion.py OUT.json``. This form wrote
`diffusion_ab_bitwise.json` (N = 576 and 2304, B = 128 and 1); a first form, which looped
over N = 576, 2304, 1296 and B = 128, 32, 1 and recorded ``bitwise_equal`` and
``max_abs_diff`` instead of the three equality fields, wrote `diffusion_ab.json`."""
import importlib.util
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from merge_model import attention  # noqa: E402

from adcam_fast.kernels.coneighbor_topk import refine_sparse  # noqa: E402
from adcam_fast.kernels import diffusion as w1  # noqa: E402


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


here = Path(__file__).parent
versions = {"v9": load("diff_v9", here / "diffusion_v9.py"), "w1": w1,
            "quads": load("diff_quads", here / "diffusion_quads.py")}
import os
import time

smoke = os.environ.get("TRITON_INTERPRET") == "1"
dev = torch.device("cpu" if smoke else "cuda")
if smoke:
    def do_bench(fn, **_):
        t0 = time.perf_counter(); fn(); return 1e3 * (time.perf_counter() - t0)
rows = []
for n in (64,) if smoke else (576, 2304):
    for b in (2,) if smoke else (128, 1):
        gen = torch.Generator(device=dev).manual_seed(n + b)
        A = attention(b, n, "random", gen, torch.float32)
        w, idx = refine_sparse(A, 50, 1e-12, torch.int32)
        del A
        cams = torch.rand(b, 20, n, generator=gen, device=dev)
        row = {"N": n, "B": b}
        outs = {}
        for name, mod in versions.items():
            default, cands = mod.diffusion_configs(20, dev)
            for cfg in cands or [default]:
                label = f"{name}_c{cfg.block_m}_w{cfg.num_warps}_p{cfg.parts}"
                fn = lambda cfg=cfg, mod=mod: mod.diffuse_sparse(w, idx, cams, 2, config=cfg)
                outs[label] = fn()
                row[label] = do_bench(fn, warmup=10, rep=50, return_mode="median")
            csr = lambda mod=mod: mod.csr_edges(w, idx)
            row[f"{name}_csr"] = do_bench(csr, warmup=10, rep=50, return_mode="median")
        # The CSR's sort alone: the flat int32 sort of N·image + destination (as csr_edges),
        # against int16 destinations sorted per image (a batched, segmented sort).
        e = idx.shape[1] * (idx.shape[2] + 1)
        keys32 = (torch.randint(0, n, (b, e), device=dev, dtype=torch.int32)
                  + n * torch.arange(b, device=dev, dtype=torch.int32)[:, None]).view(-1)
        keys16 = (keys32.view(b, e) % n).to(torch.int16)
        row["sort_flat_i32"] = do_bench(lambda: torch.sort(keys32, stable=True), warmup=10, rep=50, return_mode="median")
        row["sort_rows_i16"] = do_bench(lambda: torch.sort(keys16, dim=-1, stable=True), warmup=10, rep=50, return_mode="median")
        row["sort_rows_i32"] = do_bench(lambda: torch.sort(keys32.view(b, e) % n, dim=-1, stable=True), warmup=10, rep=50, return_mode="median")
        ref = next(iter(outs.values()))
        row["equal_to_first"] = [k for k, o in outs.items() if torch.equal(o, ref)]
        row["nan"] = [k for k, o in outs.items() if bool(o.isnan().any())]
        row["diff"] = {k: float((o - ref).abs().nan_to_num(-1).max()) for k, o in outs.items()}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
if out:
    out.write_text(json.dumps(rows, indent=1))
