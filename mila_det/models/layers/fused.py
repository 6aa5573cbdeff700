"""Convolutions with their activation or residual add fused in, for CPU
inference.

oneDNN applies an element-wise activation, or adds a residual, to a
convolution's output while it is still in cache, which saves the separate
pass over the map that eager PyTorch makes (on this project's backbones:
the GELU after ``mlp.fc1``, the SiLU gates, the ReLUs of MILA's
convolutional stem, the residual add after ``mlp.fc2`` on both backbones and
after MILA's ``out_proj``). PyTorch
exposes that through ``torch.ops.mkldnn._convolution_pointwise``, the op its
own compiler emits for frozen CPU graphs. It has no backward, so it is used
only where no gradient is needed (fp32 CPU tensors, gradients off or not
required, no autocast, not tracing); everywhere else, and on builds without
it, the same computation runs as a convolution followed by the activation
or the add.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

_MKLDNN = getattr(torch.ops, 'mkldnn', None)
_POINTWISE = getattr(_MKLDNN, '_convolution_pointwise', None)
_POINTWISE_ = getattr(_MKLDNN, '_convolution_pointwise_', None)
HAS_FUSED_CONV = bool(_POINTWISE is not None and _POINTWISE_ is not None
                      and torch.backends.mkldnn.is_available())

# name -> (eager function, oneDNN attribute, oneDNN algorithm)
ACTIVATIONS = {
    'relu': (F.relu, 'relu', ''),
    'gelu': (F.gelu, 'gelu', 'none'),  # exact (erf) GELU, as nn.GELU()
    'silu': (F.silu, 'swish', ''),
}


def _pair(x: Union[int, Tuple[int, int]]) -> list:
    return [x, x] if isinstance(x, int) else list(x)


def can_fuse(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether :func:`conv2d_act` may run fused on these tensors (the fused
    ops have no backward, so none of them may need a gradient)."""
    needs_grad = (x.requires_grad or weight.requires_grad
                  or (bias is not None and bias.requires_grad))
    return (HAS_FUSED_CONV and x.device.type == 'cpu'
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and needs_grad)
            and not torch.is_autocast_enabled('cpu')  # it picks the dtype
            and not torch.jit.is_tracing())


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
    if act is not None and can_fuse(x, weight, bias):
        _, attr, algorithm = ACTIVATIONS[act]
        return _POINTWISE(x, weight, bias, _pair(padding), _pair(stride),
                          [1, 1], groups, attr, [], algorithm)
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

    When no gradient is needed the sum is written into ``residual``'s memory
    (fused into the conv where :func:`can_fuse`), so pass a tensor that
    nothing else reads afterwards.

    Args:
        residual (Tensor): ``[B, C_out, H', W']``, the conv's output shape.
        x, weight, bias, stride, padding, groups: As in :func:`conv2d_act`.

    Returns:
        Tensor: ``[B, C_out, H', W']``.
    """
    if can_fuse(x, weight, bias) and not residual.requires_grad:
        fmt = (torch.channels_last if x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)
        if (residual.dtype == torch.float32
                and residual.is_contiguous(memory_format=fmt)):
            return _POINTWISE_(residual, x, weight, bias, _pair(padding),
                               _pair(stride), [1, 1], groups, 'add', 1.0,
                               None, [], '')
    y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    if torch.is_grad_enabled() and (y.requires_grad or residual.requires_grad):
        return residual + y
    return residual.add_(y)
