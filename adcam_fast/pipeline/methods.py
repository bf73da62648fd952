"""The localisation maps of the paper's ablation (Table 3), from one scale's CAM and A.

    cam        M = CAM                                   plain CAM (Eq. 2)
    product    M_j = CAM_j · a_j,  a_j = Σ_i A_ij         attention × CAM (TS-CAM style)
    diffusion  M ← M · rownorm(A), T times               diffusion with the unrefined A
    adcam      M ← M · Ã, T times, Ã = rownorm(TOP(S,k) ⊗ A)   AD-CAM (Eq. 6-8)

``product`` uses the attention each token receives (A's column sum) as the class-agnostic
attention map, since A carries no class-token row. Each result is normalised per class by
the caller (Eq. 2 again) after the scales are summed, so no method may weight a scale by a
factor of its own: A's rows sum to 1, so a's mean is 1 at every N (a column mean, 1/N,
weighted the 144 tokens of scale 0.5 16 times the 2304 of scale 2), and the diffusions
keep the CAM's mass.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from adcam_fast.ops import Backend, adcam

Method = Literal["cam", "product", "diffusion", "adcam"]
METHODS: tuple[str, ...] = ("cam", "product", "diffusion", "adcam")


def localise(
    method: Method, A: Tensor, cams: Tensor, k: int, steps: int, backend: Backend = "auto"
) -> Tensor:
    """Maps (B, C, N) for ``method`` from attention A (B, N, N) and CAMs (B, C, N)."""
    if method == "cam":
        return cams
    if method == "product":
        return cams * A.sum(-2, keepdim=True)
    if method == "diffusion":
        return adcam(A, cams, k=A.shape[-1], steps=steps, backend=backend)
    if method == "adcam":
        return adcam(A, cams, k=k, steps=steps, backend=backend)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
