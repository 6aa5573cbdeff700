"""Cross scan / merge: routes, adjointness, and the Triton kernels."""
import pytest
import torch

from mila_det.ops import cross_merge, cross_scan
from mila_det.ops.cross_scan import naive_cross_merge, naive_cross_scan
from tests.conftest import needs_triton


def test_routes_follow_the_spec():
    h, w = 3, 4
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    y = naive_cross_scan(x)[0, :, 0]
    rows = [r * w + c for r in range(h) for c in range(w)]
    cols = [r * w + c for c in range(w) for r in range(h)]
    assert y[0].tolist() == rows
    assert y[1].tolist() == cols
    assert y[2].tolist() == rows[::-1]
    assert y[3].tolist() == cols[::-1]


@pytest.mark.parametrize('hw', [(7, 9), (1, 5), (6, 6)],
                         ids=lambda s: f'{s[0]}x{s[1]}')
def test_merge_is_the_adjoint_of_scan(hw):
    x = torch.randn(2, 60, *hw, dtype=torch.float64)
    y = torch.randn(2, 4, 60, hw[0] * hw[1], dtype=torch.float64)
    lhs = (naive_cross_scan(x) * y).sum()
    rhs = (x.flatten(2) * naive_cross_merge(y, *hw)).sum()
    torch.testing.assert_close(lhs, rhs)


@needs_triton()
@pytest.mark.parametrize('hw', [(7, 9), (33, 40), (1, 5)],
                         ids=lambda s: f'{s[0]}x{s[1]}')
def test_triton_scan_and_merge_match_reference(hw):
    x = torch.randn(2, 60, *hw, requires_grad=True)
    y_ref, y_tri = naive_cross_scan(x), cross_scan(x, backend='triton')
    torch.testing.assert_close(y_tri, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y_ref)
    torch.testing.assert_close(torch.autograd.grad(y_tri, x, dy)[0],
                               torch.autograd.grad(y_ref, x, dy)[0])
    s = torch.randn(2, 4, 60, hw[0] * hw[1], requires_grad=True)
    m_ref = naive_cross_merge(s, *hw)
    m_tri = cross_merge(s, *hw, backend='triton')
    torch.testing.assert_close(m_tri, m_ref)
    dm = torch.randn_like(m_ref)
    torch.testing.assert_close(torch.autograd.grad(m_tri, s, dm)[0],
                               torch.autograd.grad(m_ref, s, dm)[0])
