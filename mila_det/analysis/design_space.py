"""FLOP counting for the MILA paper's design-space backbones.

"Demystify Mamba in Vision: A Linear Attention Perspective" (Han et al.,
NeurIPS 2024), Tables 1 and 2. Everything is counted by
:func:`~.complexity.flop_analyzer` (one multiply-add counts once). The
forget gate's causal scan runs on the selective scan's autograd Function,
which the tracer records as one node; it is counted analytically as a
selective scan of the value channels with the q/k head width as state size,
``9 * B * L * C * N`` (Albert Gu's count; see
:func:`~.complexity.selective_scan_macs`), without a ``D`` term (a
design-space shortcut adds its ``D * v`` outside the scan). Norms are
left out, as the paper's convention has it (MMEngine's analyzer counts
them by default, ``5 * numel`` per LayerNorm: 0.02 G for the baseline).
"""
from typing import List

from mmengine.analysis import FlopAnalyzer
from torch import nn

from .complexity import (SCAN_OPS, flop_analyzer, scan_handle,
                         selective_scan_macs)


def forget_gate_macs(batch: int, length: int, channels: int,
                     d_state: int) -> int:
    """Multiply-adds of one forget-gate scan: ``9 * B * L * C * N``."""
    return selective_scan_macs(batch, length, channels, d_state, 'gu',
                               with_d=False)


def _not_counted(inputs: List, outputs: List) -> int:
    return 0


# Counted by MMEngine's analyzer by default, not in the paper's convention.
NORM_OPS = ('aten::layer_norm', 'aten::batch_norm', 'aten::group_norm',
            'aten::instance_norm')


def design_space_flop_analyzer(model: nn.Module, inputs,
                               count_norms: bool = False) -> FlopAnalyzer:
    """:func:`~.complexity.flop_analyzer` that counts the forget-gate scan
    without a ``D`` term (see the module docstring) and, unless
    ``count_norms``, leaves the norms out (as the design-space tables
    count: linear, conv and attention multiply-adds only). Defaults to
    False."""
    analyzer = flop_analyzer(model, inputs)
    handles = {op: scan_handle('gu', layout, with_d=False)
               for op, layout in SCAN_OPS.items()}
    if not count_norms:  # (a None handle would not replace MMEngine's)
        handles.update(dict.fromkeys(NORM_OPS, _not_counted))
    analyzer.set_op_handle(**handles)
    return analyzer
