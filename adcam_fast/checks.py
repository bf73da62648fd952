"""Input validation shared by every AD-CAM entry point.

Each check raises ``ValueError`` naming the argument and what was expected; nothing is
broadcast silently.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor


def check_float_tensor(x: object, name: str) -> Tensor:
    """x is a torch.Tensor of a floating dtype."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _square(x: object, name: str) -> Tensor:
    """x is a floating tensor of shape (..., N, N), N >= 1."""
    x = check_float_tensor(x, name)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2] or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., N, N) with N >= 1, got {tuple(x.shape)}")
    return x


def check_attention(A: object, name: str = "A", values: bool = True) -> Tensor:
    """A is (..., N, N), floating and, when ``values``, finite and non-negative.

    The value check is one read of A (``aminmax``: NaN propagates into both ends, ±inf
    shows in one) and one host sync; only a failing A is read again, to count its bad
    entries for the message.
    """
    A = _square(A, name)
    if not values or A.numel() == 0:
        return A
    lo, hi = torch.aminmax(A)
    if not bool((lo >= 0) & (hi < torch.inf)):
        bad = (~torch.isfinite(A)) | (A < 0)
        raise ValueError(
            f"{name} must be finite and non-negative ({int(bad.sum())} entries are not)"
        )
    return A


def check_square(A: object, name: str) -> Tensor:
    """A is (..., N, N), floating and finite (no sign constraint)."""
    A = _square(A, name)
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{name} must be finite")
    return A


def check_cams(
    cams: object, A: Tensor, name: str = "cams", values: bool = True, a_name: str = "A"
) -> Tensor:
    """cams is (..., K, N) with exactly the leading dims and N of A (named ``a_name`` in
    errors), on A's device, and, when ``values`` (one host sync), finite."""
    cams = check_float_tensor(cams, name)
    lead, n = tuple(A.shape[:-2]), A.shape[-1]
    if cams.ndim != A.ndim or tuple(cams.shape[:-2]) != lead or cams.shape[-1] != n:
        raise ValueError(
            f"{name} must have shape {(*lead, 'K', n)} to match {a_name} {tuple(A.shape)}, "
            f"got {tuple(cams.shape)}"
        )
    if cams.device != A.device:
        raise ValueError(
            f"{name} is on {cams.device} but {a_name} is on {A.device}: use one device for both"
        )
    if values and not bool(torch.isfinite(cams).all()):
        raise ValueError(f"{name} must be finite")
    return cams


def _integer(x: object, name: str, least: int) -> int:
    """x as a Python int >= ``least``: any integer type (``numpy.int64`` too, through
    ``__index__``) but bool."""
    if not isinstance(x, bool):
        try:
            value = operator.index(x)
        except TypeError:
            pass
        else:
            if value >= least:
                return value
    raise ValueError(f"{name} must be an integer >= {least}, got {x!r}")


def check_k(k: object) -> int:
    """k is an integer >= 1."""
    return _integer(k, "k", 1)


def check_steps(steps: object) -> int:
    """steps is an integer >= 0."""
    return _integer(steps, "steps", 0)


def check_eps(eps: object) -> float:
    """eps is a finite number >= 0 (the kept mass at or below which a row is the self row)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_fp32_range(x: Tensor, name: str) -> None:
    """x, if float64, holds no value beyond float32's range (one host sync; none otherwise),
    for the paths that compute in float32."""
    top = torch.finfo(torch.float32).max
    if x.dtype == torch.float64 and x.numel() and bool(x.abs().max() > top):
        raise ValueError(
            f"{name} holds values beyond float32's range, which the triton backend computes "
            'in: use backend="torch"'
        )


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted dtype of the inputs, at least float32 (half inputs are upcast)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
