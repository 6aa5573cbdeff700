"""Complexity counting: the analytic scan count, the counter on models with
closed-form costs, and the published backbone figures."""
import pytest
import torch
from torch import nn

from mila_det.analysis import backbone_macs, flop_analyzer, selective_scan_macs
from mila_det.models.backbones import MILA, VMamba
from mila_det.ops import selective_scan


def test_selective_scan_count_by_hand():
    # B=2, L=10, D=6 channels, N=3: Gu 9*B*L*D*N + B*D*L; Vim 4*B*L*D*N
    assert selective_scan_macs(2, 10, 6, 3) == 9 * 360 + 120 == 3360
    assert selective_scan_macs(2, 10, 6, 3, with_d=False) == 3240
    assert selective_scan_macs(2, 10, 6, 3, 'vim') == 1440
    with pytest.raises(ValueError, match='convention'):
        selective_scan_macs(1, 1, 1, 1, 'thop')


class ScanOnly(nn.Module):
    def __init__(self, channels=8, groups=2, n_state=4):
        super().__init__()
        self.A = nn.Parameter(-torch.rand(channels, n_state))
        self.D = nn.Parameter(torch.ones(channels))
        self.groups, self.n_state = groups, n_state

    def forward(self, u):
        b, d, length = u.shape
        bc = torch.ones(b, self.groups, self.n_state, length)
        return selective_scan(u, u, self.A, bc, bc, self.D, None, True)


@pytest.mark.parametrize('convention, expected', [
    ('gu', 9 * 1 * 50 * 8 * 4 + 8 * 50), ('vim', 4 * 50 * 8 * 4)])
def test_analyzer_counts_the_scan_operator(convention, expected):
    analyzer = flop_analyzer(ScanOnly(), (torch.randn(1, 8, 50), ),
                             convention)
    assert analyzer.total() == expected


def test_analyzer_on_closed_form_model():
    """conv 3x3 (C_in 3 -> 8) on 16x16, then linear 8 -> 5 per pixel, then
    a token matmul x^T x: each multiply-add counted once."""

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.fc = nn.Linear(8, 5, bias=False)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)  # [1, 256, 8]
            y = self.fc(t)  # [1, 256, 5]
            return y.transpose(1, 2) @ y  # [1, 5, 5]

    analyzer = flop_analyzer(Small(), (torch.randn(1, 3, 16, 16), ))
    assert analyzer.total() == 256 * 8 * 27 + 256 * 8 * 5 + 5 * 5 * 256


def test_mila_attention_matmuls_are_counted():
    """Per block: q . mean(k) (N C), rope(k)^T v and rope(q) kv (N C d each),
    counted on the attention op's node."""
    model = MILA(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                           num_heads=(2, 2, 2, 2)))
    macs = backbone_macs(model, (64, 64))
    per_stage = []
    n, c = 16 * 16, 16
    for i in range(4):
        d = c // 2
        per_stage.append(2 * n * c * d + n * c)
        n, c = n // 4, c * 2
    analyzer = flop_analyzer(model.eval(), (torch.randn(1, 3, 64, 64), ))
    by_op = analyzer.by_module_and_operator()
    for i in range(4):
        ops = by_op[f'layers.{i}']
        assert ops['linear_attention_parallel'] == per_stage[i]
        assert 'matmul' not in ops and 'einsum' not in ops
    assert macs['total'] == analyzer.total()


@pytest.mark.parametrize('arch, side, published', [
    ('tiny', 224, 4.907), ('small', 224, 8.718)])
def test_vmamba_backbone_flops_as_published(arch, side, published):
    total = backbone_macs(VMamba(arch), (side, side))['total']
    assert abs(total / 1e9 - published) < 0.001


def test_vmamba_count_is_the_same_on_both_scan_paths(monkeypatch):
    """The CPU path (batched matmuls, token-major scan) and the authors'
    layout (cross scan, einsums, channel-first scan, merge) count the same
    multiply-adds (up to MMEngine's einsum handle, which estimates through
    numpy's einsum_path and is off by up to ~1e-5 on tiny maps)."""
    import importlib
    from functools import partial

    from mila_det.ops.cross_scan import naive_cross_merge, naive_cross_scan
    from mila_det.ops.cross_selective_scan.naive import \
        compose_cross_selective_scan
    from mila_det.ops.selective_scan import chunk_selective_scan
    model = VMamba(arch=dict(dims=16, depths=(1, 1, 2, 1), ssm_ratio=2.0,
                             d_state=2))
    fast = backbone_macs(model, (64, 96))
    css = importlib.import_module('mila_det.ops.cross_selective_scan')
    authors_layout = partial(
        compose_cross_selective_scan, cross_scan=naive_cross_scan,
        selective_scan=chunk_selective_scan, cross_merge=naive_cross_merge)
    monkeypatch.setitem(css.IMPLS, 'torch', authors_layout)
    authors = backbone_macs(model, (64, 96))
    assert authors.keys() == fast.keys()
    for name in fast:
        assert fast[name] == pytest.approx(authors[name], rel=1e-4), name
