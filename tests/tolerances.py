"""Numeric comparisons whose tolerance scales with the magnitude of what is compared.

fp32 results differ in the last bits between CPU families (Intel, AMD), thread counts and matrix
shapes (a 7-row and a 24-row matmul take different BLAS kernels). The rounding error of a sum of
products grows with the size of its terms, not with each output element, so an elementwise
tolerance (`rtol * |expected|`) fails on elements near zero. Every comparison here bounds
max|actual - expected| by `rel * max|expected|` instead, and each bound below says why it is safe.
Imported as a plain module (tests/ is on sys.path through its conftest).
"""

from __future__ import annotations

import torch

# Measured: the whole suite at 1 and 2 threads on AMD EPYC; on an Intel Xeon the positions-only
# logits differed by 3.6e-5 on logits up to 33, i.e. 1.1e-6 of scale (an elementwise 1e-5 failed).
# Same math, another kernel (batch shape, summation order) through a few layers in fp32:
# measured <= 5e-7 of scale (20x margin); a leaked pad frame or a wrong mask is >= 1e-2.
FP32_SHALLOW = 1e-5
# Same math through a 30-layer LLM or a Transformer encoder in fp32, another kernel: the error grows
# with depth; measured <= 2.6e-6 of scale (40x margin); a wrong position or mask moves it by >= 1e-1.
FP32_DEEP = 1e-4
# Two independent implementations (torchtune vs transformers, ours vs WhisperEncoder) of one fp32
# model: other op order (fused q/k/v, RoPE layout); measured <= 1.1e-6 of scale; a wrong RoPE is >= 1e-1.
FP32_PARITY = 1e-4


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|: the largest error relative to the reference's scale."""
    actual, expected = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    scale = expected.abs().max()
    return float((actual - expected).abs().max() / scale) if scale > 0 else float((actual - expected).abs().max())


def assert_close_to_scale(actual, expected, rel: float, msg: str = "") -> None:
    """Shapes equal and max|actual - expected| <= rel * max|expected|."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d = rel_diff(actual, expected)
    assert d <= rel, f"{msg} max|diff| = {d:.2e} of max|expected| (allowed {rel:.0e})"
