from ._dispatch import HAS_TRITON, dispatch, resolve_backend
from .cross_scan import cross_merge, cross_scan
from .cross_selective_scan import cross_selective_scan
from .linear_attention import linear_attention, rope_table
from .selective_scan import selective_scan

__all__ = ['HAS_TRITON', 'dispatch', 'resolve_backend', 'cross_scan',
           'cross_merge', 'cross_selective_scan', 'linear_attention',
           'rope_table', 'selective_scan']
