"""The one switch for the CPU fast paths of the layers, and the fused
convolutions behind it.

With the switch on (the default; ``MILA_DET_CPU_FUSION=0`` or
:func:`set_cpu_fusion` turns it off) the layers take these CPU-only routes:

- token projections run as oneDNN 1x1 convolutions on channels-last views
  instead of MKL's linear (:func:`use_onednn_projection`);
- where no gradient is needed (:func:`can_fuse`): a convolution's
  activation or residual add runs inside it
  (``torch.ops.mkldnn._convolution_pointwise``, the op PyTorch's own
  compiler emits for frozen CPU graphs; exporters see the plain
  composition), residual sums are written into the residual's memory;
- always (:func:`can_fold`): an eval-mode BatchNorm is folded into the conv
  before it, and ``x + dwconv(x)`` is one conv with the identity added to
  its centre tap (both exact re-associations, gradients included).

With it off, every layer computes the plain composition of PyTorch
modules (``linear``, ``conv2d``, then the activation, the norm or the add).
That plain path is the definition the tests compare the fast one with;
other devices use it whatever the switch says.
"""
import os
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mila_det.ops._op import register_export_lowering

_MKLDNN = getattr(torch.ops, 'mkldnn', None)
_POINTWISE = getattr(_MKLDNN, '_convolution_pointwise', None)
_POINTWISE_UNARY = getattr(_POINTWISE, 'default', None)
# the residual add, written into the residual
_POINTWISE_ADD_ = getattr(getattr(_MKLDNN, '_convolution_pointwise_', None),
                          'binary', None)
HAS_FUSED_CONV = bool(_POINTWISE_UNARY is not None
                      and _POINTWISE_ADD_ is not None
                      and torch.backends.mkldnn.is_available())

# name -> (eager function, oneDNN attribute, oneDNN algorithm)
ACTIVATIONS = {
    'relu': (F.relu, 'relu', ''),
    'gelu': (F.gelu, 'gelu', 'none'),  # exact (erf) GELU, as nn.GELU()
    'silu': (F.silu, 'swish', ''),
}


def _pair(x: Union[int, Tuple[int, int]]) -> list:
    return [x, x] if isinstance(x, int) else list(x)


FUSION_ENV = 'MILA_DET_CPU_FUSION'
_enabled = os.environ.get(FUSION_ENV, '1') != '0'


def cpu_fusion_enabled() -> bool:
    """Whether the CPU fast paths are on (see the module docstring)."""
    return _enabled


def set_cpu_fusion(enabled: bool) -> bool:
    """Turn the CPU fast paths on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextmanager
def cpu_fusion(enabled: bool) -> Iterator[None]:
    """Run a block with the CPU fast paths on or off."""
    previous = set_cpu_fusion(enabled)
    try:
        yield
    finally:
        set_cpu_fusion(previous)


def use_onednn_projection(x: Tensor) -> bool:
    """Whether a token projection of ``x`` runs as a oneDNN 1x1 conv (CPU,
    fp32/bf16/fp16)."""
    return (_enabled and x.device.type == 'cpu'
            and x.dtype != torch.float64 and x.numel() > 0)


def can_fold(x: Tensor) -> bool:
    """Whether the re-associations that keep gradients exact (an eval-mode
    BatchNorm folded into its conv, ``x + dwconv(x)`` as one conv) apply to
    a layer on ``x``: the switch is on and ``x`` is on the CPU."""
    return _enabled and x.device.type == 'cpu'


def no_grad_needed(*tensors: Optional[Tensor]) -> bool:
    """True when no gradient can flow into any of ``tensors``."""
    return not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors))


def can_fuse(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether the inference fusions may run on these tensors: the switch is
    on, they are fp32 on the CPU, none needs a gradient (the fused ops have
    no backward) and no autocast."""
    return (_enabled and x.device.type == 'cpu'
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and no_grad_needed(x, weight, bias)
            and not torch.is_autocast_enabled('cpu'))  # it picks the dtype


def _pointwise_definition(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          padding: List[int], stride: List[int],
                          dilation: List[int], groups: int, attr: str,
                          scalars: list, algorithm: Optional[str]) -> Tensor:
    """What ``mkldnn._convolution_pointwise`` computes, for the attributes
    :func:`conv2d_act` passes: the op's export lowering."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if attr == 'none':
        return y
    for act, name, algo in ACTIVATIONS.values():
        if name == attr and (algorithm or '') == algo and not scalars:
            return act(y)
    raise NotImplementedError(
        f'no export lowering for mkldnn._convolution_pointwise with '
        f'attr={attr!r}, algorithm={algorithm!r}')


def _conv2d_add_onednn(residual: Tensor, x: Tensor, weight: Tensor,
                       bias: Optional[Tensor], stride: List[int],
                       padding: List[int], groups: int) -> None:
    """``residual += conv2d(x, weight, bias)`` inside oneDNN's conv."""
    _POINTWISE_ADD_(residual, x, weight, bias, padding, stride, [1, 1],
                    groups, 'add', 1.0, None, [], '')


def _conv2d_add_definition(residual: Tensor, x: Tensor, weight: Tensor,
                           bias: Optional[Tensor], stride: List[int],
                           padding: List[int], groups: int) -> None:
    """The same as plain PyTorch: how graphs see the op."""
    residual.add_(F.conv2d(x, weight, bias, stride, padding, 1, groups))


# Inference only: neither oneDNN call has a gradient.
# - The activation's conv is called as it is (wrapped in an op, each call
#   was measurably slower; docs/benchmarks.md), with an export lowering.
# - The residual add writes the sum into the residual (faster than a new
#   output, and one map less in memory), which oneDNN's in-place variant
#   does. A mutating op reaches exporters as ``auto_functionalized``, which
#   has no ONNX translation, so it is wrapped in ``mila_det::conv2d_add_``:
#   CPU tensors run oneDNN; the CompositeImplicitAutograd kernel, which
#   PyTorch uses only where no kernel of the backend applies (fake tensors
#   while torch.compile and torch.export trace), is the plain in-place add,
#   so graphs hold the plain composition and functionalize it.
if HAS_FUSED_CONV:
    register_export_lowering(_POINTWISE_UNARY, _pointwise_definition)
    _LIBRARY = torch.library.Library('mila_det', 'FRAGMENT')
    _LIBRARY.define('conv2d_add_(Tensor(a!) residual, Tensor x, '
                    'Tensor weight, Tensor? bias, int[] stride, '
                    'int[] padding, int groups) -> ()')
    _LIBRARY.impl('conv2d_add_', _conv2d_add_onednn, 'CPU')
    _LIBRARY.impl('conv2d_add_', _conv2d_add_definition,
                  'CompositeImplicitAutograd')
    conv2d_add_ = torch.ops.mila_det.conv2d_add_.default


def conv2d_act(x: Tensor,
               weight: Tensor,
               bias: Optional[Tensor] = None,
               act: Optional[str] = None,
               stride: Union[int, Tuple[int, int]] = 1,
               padding: Union[int, Tuple[int, int]] = 0,
               groups: int = 1) -> Tensor:
    """``act(conv2d(x, weight, bias))``, one pass when :func:`can_fuse`.

    Args:
        x (Tensor): ``[B, C_in, H, W]`` (channels-last memory runs best).
        weight (Tensor): ``[C_out, C_in / groups, kH, kW]``.
        bias (Tensor, optional): ``[C_out]``. Defaults to None.
        act (str, optional): ``'relu'``, ``'gelu'``, ``'silu'`` or None
            (no activation). Defaults to None.
        stride, padding, groups: As in :func:`torch.nn.functional.conv2d`
            (no dilation).

    Returns:
        Tensor: ``[B, C_out, H', W']``.
    """
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f'conv2d_act: act must be one of '
                         f'{sorted(ACTIVATIONS)} or None, got {act!r}')
    if act is not None and HAS_FUSED_CONV and can_fuse(x, weight, bias):
        _, attr, algorithm = ACTIVATIONS[act]
        return _POINTWISE_UNARY(x, weight, bias, _pair(padding),
                                _pair(stride), [1, 1], groups, attr, [],
                                algorithm)
    y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    return y if act is None else ACTIVATIONS[act][0](y)


def conv2d_add(residual: Tensor,
               x: Tensor,
               weight: Tensor,
               bias: Optional[Tensor] = None,
               stride: Union[int, Tuple[int, int]] = 1,
               padding: Union[int, Tuple[int, int]] = 0,
               groups: int = 1) -> Tensor:
    """``residual + conv2d(x, weight, bias)``.

    Where :func:`can_fuse` the sum is written into ``residual``'s memory
    (inside the conv when the build has it), so pass a tensor that nothing
    else reads afterwards.

    Args:
        residual (Tensor): ``[B, C_out, H', W']``, the conv's output shape.
        x, weight, bias, stride, padding, groups: As in :func:`conv2d_act`.

    Returns:
        Tensor: ``[B, C_out, H', W']``.
    """
    fuse = can_fuse(x, weight, bias) and no_grad_needed(residual)
    if fuse and HAS_FUSED_CONV:
        fmt = (torch.channels_last if x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)
        if (residual.dtype == torch.float32
                and residual.is_contiguous(memory_format=fmt)):
            conv2d_add_(residual, x, weight, bias, _pair(stride),
                        _pair(padding), groups)
            return residual
    y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    return residual.add_(y) if fuse else residual + y
