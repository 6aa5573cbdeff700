"""Parameter and FLOP counts in the papers' convention.

One multiply-add counts once (fvcore / MMEngine's analyzer). Convolutions,
linears and every matmul are counted by MMEngine's
:class:`~mmengine.analysis.FlopAnalyzer`. The operators the tracer cannot
see into are counted analytically: MILA's attention as its products
(:func:`linear_attention_macs`), and the selective scan:

* ``gu`` (default, as VMamba's authors count it): ``9 * B * L * D * N``
  for the scan plus ``B * D * L`` for the skip term, with D the channels of
  all four scan directions. Every VMamba has the skip term, so it is always
  counted, per route as the authors do, even where SS2D adds the four
  routes' terms in one pass after merging them (the token-major CPU path);
* ``vim`` (Vision Mamba's eq. 8 as usually cited):
  ``3 * B * L * D * N + B * L * D * N`` = ``4 * B * L * D * N``.
"""
from typing import Callable, Dict, List, Sequence

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape
from torch import nn

from mila_det.models.layers import cpu_fusion

# The scan's ops (one per fast path), and how to read (B, L, channels) from
# the shape of their first input ``u``.
SCAN_OPS = {
    'mila_det::selective_scan_triton': lambda s: (s[0], s[2], s[1]),
    'mila_det::selective_scan_chunk':  # [B, G, L, Dg]
    lambda s: (s[0], s[2], s[1] * s[3]),
}


def selective_scan_macs(batch: int, length: int, channels: int,
                        d_state: int, convention: str = 'gu',
                        with_d: bool = True) -> int:
    """Multiply-adds of one selective scan of ``channels`` sequences.

    ``gu``: per token, channel and state, 9 operations (Albert Gu's count:
    ``delta*A`` and its ``exp``, ``delta*B``, times ``u``, the state update
    ``a*h + b`` (2), ``C*h`` and the sum over states (2), and one more for
    the discretised input), plus one per token and channel for ``D*u``.
    ``vim``: ``3 BLDN + BLDN`` (the Vim paper's equation 8), no D term.
    """
    if convention == 'gu':
        return 9 * batch * length * channels * d_state + (
            batch * channels * length if with_d else 0)
    if convention == 'vim':
        return 4 * batch * length * channels * d_state
    raise ValueError(f'unknown SSM FLOP convention {convention!r}; use '
                     "'gu' or 'vim'")


def scan_handle(convention: str, layout: Callable,
                with_d: bool = True) -> Callable:
    """An analyzer handle for one of :data:`SCAN_OPS`: reads ``(B, L,
    channels)`` from ``u`` by ``layout`` and ``N`` from ``A: [channels,
    N]``; counts the ``D`` term when ``with_d``. Defaults to True."""
    def handle(inputs: List, outputs: List) -> int:
        batch, length, channels = layout(get_shape(inputs[0]))
        d_state = get_shape(inputs[2])[1]
        return selective_scan_macs(batch, length, channels, d_state,
                                   convention, with_d)
    return handle


# MILA's linear attention ops (one per fast path); their arguments are
# ``q, k, v: [B, N, C], num_heads, ...``.
ATTENTION_OPS = ('mila_det::linear_attention_parallel',
                 'mila_det::linear_attention_triton')


def linear_attention_macs(batch: int, length: int, channels: int,
                          num_heads: int) -> int:
    """Multiply-adds of MILA's attention products, as the tracer counts
    them in the plain composition: ``k^T v`` and ``q kv`` (``B N C d``
    each, ``d = C / heads``) and the normaliser ``q . mean(k)`` (``B N
    C``)."""
    head_dim = channels // num_heads
    return 2 * batch * length * channels * head_dim + batch * length * \
        channels


def _attention_handle(inputs: List, outputs: List) -> int:
    batch, length, channels = get_shape(inputs[0])
    return linear_attention_macs(batch, length, channels,
                                 inputs[3].toIValue())


def _baddbmm_handle(inputs: List, outputs: List) -> int:
    """``baddbmm(bias, x, w)``: the product's multiply-adds, as for addmm
    (the bias add is not counted)."""
    batch, rows, inner = get_shape(inputs[1])
    return batch * rows * inner * get_shape(inputs[2])[-1]


class _PlainFlopAnalyzer(FlopAnalyzer):
    """Traces the model with the layers' CPU fast paths off, so the tracer
    records the plain ``linear`` / ``conv`` / norm ops that the handles
    count, not the fused oneDNN calls (same arithmetic, other op names)."""

    def _analyze(self):  # MMEngine's one tracing entry, run on first query
        with cpu_fusion(False):
            return super()._analyze()


def flop_analyzer(model: nn.Module, inputs, ssm_convention: str = 'gu'
                  ) -> FlopAnalyzer:
    """An MMEngine analyzer of ``model(*inputs)`` that also counts the
    selective scan (see the module docstring)."""
    if ssm_convention not in ('gu', 'vim'):
        raise ValueError(f'unknown SSM FLOP convention {ssm_convention!r}')
    analyzer = _PlainFlopAnalyzer(model, inputs)
    handles = {op: scan_handle(ssm_convention, layout)
               for op, layout in SCAN_OPS.items()}
    handles.update({op: _attention_handle for op in ATTENTION_OPS})
    handles['aten::baddbmm'] = _baddbmm_handle
    analyzer.set_op_handle(**handles)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_macs(model: nn.Module, shape: Sequence[int],
                  ssm_convention: str = 'gu') -> Dict[str, int]:
    """MACs of a backbone on one ``3 x H x W`` image: ``total`` and one entry
    per top-level child (``patch_embed``, ``layers.0``, ...)."""
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.randn(1, 3, *shape, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        analyzer = flop_analyzer(model, (x, ), ssm_convention)
        by_module = analyzer.by_module()
        total = analyzer.total()
    model.train(was_training)
    out = {'total': total}
    for name in by_module:
        if name and name.count('.') <= 1 and (
                name.startswith('layers.') or '.' not in name):
            out[name] = by_module[name]
    return out


class _TensorMode(nn.Module):
    """A detector called as ``detector(x, samples, mode='tensor')``: the
    forward MMDetection's get_flops counts (RPN proposals through the RoI
    heads)."""

    def __init__(self, detector: nn.Module, samples) -> None:
        super().__init__()
        self.detector, self.samples = detector, samples

    def forward(self, x):
        return self.detector(x, self.samples, mode='tensor')


def detector_macs(detector: nn.Module, shape: Sequence[int],
                  ssm_convention: str = 'gu') -> int:
    """Multiply-adds of a whole detector's forward on one ``3 x H x W``
    image with synthetic annotations."""
    from mila_det.utils.synthetic import synthetic_det_batch
    device = next(detector.parameters()).device
    images, samples = synthetic_det_batch(1, *shape, device)
    data = detector.data_preprocessor(
        dict(inputs=[(images[0] * 50 + 110).clamp(0, 255)],
             data_samples=samples), False)
    was_training = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            analyzer = flop_analyzer(
                _TensorMode(detector, data['data_samples']),
                (data['inputs'], ), ssm_convention)
            return analyzer.total()
    finally:
        detector.train(was_training)
