"""Helpers of the kernel tests (a uniquely named module: `from conftest import` is ambiguous
when several test folders have a conftest.py)."""

import torch

HAS_CUDA = torch.cuda.is_available()


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def tolerance_violation(name, got, ref32, ref_lp, factor, floor):
    """flash-attention's rule: |got - ref32| <= factor * |ref_lp - ref32| + floor (max norm).
    Returns what is wrong (a message), or None when the rule holds."""
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values"
    err, base = max_err(got, ref32), max_err(ref_lp, ref32)
    if err > factor * base + floor:
        return f"{name}: error {err:.3e} > {factor} x {base:.3e} + {floor:.0e}"
    return None


def check_tolerance(name, got, ref32, ref_lp, factor, floor):
    problem = tolerance_violation(name, got, ref32, ref_lp, factor, floor)
    assert problem is None, problem
