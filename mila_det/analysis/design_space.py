"""FLOP counting for the MILA paper's design-space backbones.

"Demystify Mamba in Vision: A Linear Attention Perspective" (Han et al.,
NeurIPS 2024), Tables 1 and 2. Everything is counted by
:func:`~.complexity.flop_analyzer` (one multiply-add counts once), except
the forget gate's causal scan: the tracer sees it as one
``ForgetGateScanFunction`` node (see
:mod:`mila_det.models.layers.design_block`), counted analytically as a
selective scan of the value channels with the q/k head width as state size,
``9 * B * L * C * N`` (Albert Gu's count; see
:func:`~.complexity.selective_scan_macs`), without a ``D`` term. Norms are
left out, as the paper's convention has it (MMEngine's analyzer counts
them by default, ``5 * numel`` per LayerNorm: 0.02 G for the baseline).
"""
from typing import List

from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape
from torch import nn

from .complexity import flop_analyzer, selective_scan_macs

FORGET_GATE_OP = 'prim::PythonOp.ForgetGateScanFunction'


def forget_gate_macs(batch: int, length: int, channels: int,
                     d_state: int) -> int:
    """Multiply-adds of one forget-gate scan: ``9 * B * L * C * N``."""
    return selective_scan_macs(batch, length, channels, d_state, 'gu',
                               with_d=False)


def _forget_gate_handle(inputs: List, outputs: List) -> int:
    """Inputs ``(q, k, v, delta, A, ...)``: ``v: [B, L, C]``,
    ``A: [C, N]``."""
    batch, length, channels = get_shape(inputs[2])
    d_state = get_shape(inputs[4])[1]
    return forget_gate_macs(batch, length, channels, d_state)


def _not_counted(inputs: List, outputs: List) -> int:
    return 0


# Counted by MMEngine's analyzer by default, not in the paper's convention.
NORM_OPS = ('aten::layer_norm', 'aten::batch_norm', 'aten::group_norm',
            'aten::instance_norm')


def design_space_flop_analyzer(model: nn.Module, inputs,
                               count_norms: bool = False) -> FlopAnalyzer:
    """:func:`~.complexity.flop_analyzer` that also counts the forget-gate
    scan (see the module docstring) and, unless ``count_norms``, leaves the
    norms out (as the design-space tables count: linear, conv and attention
    multiply-adds only). Defaults to False."""
    analyzer = flop_analyzer(model, inputs)
    handles = {FORGET_GATE_OP: _forget_gate_handle}
    if not count_norms:  # (a None handle would not replace MMEngine's)
        handles.update(dict.fromkeys(NORM_OPS, _not_counted))
    analyzer.set_op_handle(**handles)
    return analyzer
