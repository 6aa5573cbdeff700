from ._dispatch import HAS_TRITON, dispatch, resolve_backend, use_backend
from .cross_scan import cross_merge, cross_scan
from .cross_selective_scan import cross_selective_scan
from .forget_gate import forget_gate_attention
from .linear_attention import linear_attention, rope_table
from .selective_scan import selective_scan
from . import _export  # noqa: F401,E402  (torch.ops.mila_det.linear_recurrence)

__all__ = ['HAS_TRITON', 'dispatch', 'resolve_backend', 'use_backend',
           'cross_scan',
           'cross_merge', 'cross_selective_scan', 'linear_attention',
           'rope_table', 'selective_scan', 'forget_gate_attention']
