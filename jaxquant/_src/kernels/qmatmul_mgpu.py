"""Placeholder until the Hopper kernel lands: no kernel applies, so auto falls back to XLA."""

from __future__ import annotations


def can_use(x, q, compute_dtype) -> bool:
    return False


def qmatmul(x, q, *, compute_dtype, interpret=False):
    raise NotImplementedError("the Mosaic GPU qmatmul kernel is not built yet; use implementation='xla'")
