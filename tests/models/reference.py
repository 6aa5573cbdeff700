"""The comparison with the official-output fixtures of
tests/data/reference (see its README), shared by the backbone tests."""
from typing import Sequence

import torch
from torch import nn


def assert_reproduces(model: nn.Module, cases: Sequence[dict],
                      atol: float = 1e-4) -> None:
    """``model`` (in eval mode) gives every case's four official output
    maps, shape for shape, within ``atol`` (no relative slack)."""
    assert cases
    with torch.no_grad():
        for case in cases:
            outs = model(case['input'])
            assert len(outs) == len(case['outputs']) == 4
            for got, want in zip(outs, case['outputs']):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=atol)
