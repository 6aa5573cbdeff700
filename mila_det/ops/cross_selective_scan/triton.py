"""VMamba's four-route selective scan on the Triton kernels of
:mod:`mila_det.ops.cross_scan.triton` and
:mod:`mila_det.ops.selective_scan.triton`, in the order of the definition
(:mod:`.naive`)."""
from torch import Tensor

from ..cross_scan.triton import cross_merge_triton, cross_scan_triton
from ..selective_scan.triton import triton_selective_scan
from .naive import compose_cross_selective_scan


def triton_cross_selective_scan(x: Tensor, x_proj_weight: Tensor,
                                dt_projs_weight: Tensor,
                                dt_projs_bias: Tensor, A_logs: Tensor,
                                Ds: Tensor) -> Tensor:
    """Same arguments and result as
    :func:`~.naive.naive_cross_selective_scan`."""
    return compose_cross_selective_scan(
        x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
        cross_scan_triton, triton_selective_scan, cross_merge_triton)
