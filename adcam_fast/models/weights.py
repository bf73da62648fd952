"""A state dict against the one a model expects, as an error message names the difference."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def mismatch(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], optional: tuple[str, ...] = ()
) -> str | None:
    """``missing [...], unexpected [...], of other shapes [...]`` (up to five keys each): the
    keys of ``expected`` that ``given`` lacks (but those starting with one of ``optional``),
    its keys beyond them, and those of another shape; None when ``given`` fits."""
    missing = sorted(k for k in set(expected) - set(given) if not k.startswith(optional))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    if not (missing or unexpected or reshaped):
        return None

    def some(keys: list[str]) -> str:
        return f"{keys[:5]}{'...' if len(keys) > 5 else ''}"

    return (
        f"missing {some(missing)}, unexpected {some(unexpected)}, of other shapes {some(reshaped)}"
    )
