"""Host-side checks every Triton launcher makes before it launches.

A kernel launches on the *current* CUDA device, whatever device its tensors
live on: tensors on ``cuda:1`` with device 0 current would be read through
the wrong context. :func:`device_guard` checks that every tensor argument
is on one device and makes that device current for the launch.
"""
import contextlib
from typing import ContextManager, Optional

import torch
from torch import Tensor


def device_guard(op: str, **tensors: Optional[Tensor]) -> ContextManager:
    """A context that runs ``op``'s launches on its tensors' device.

    Args:
        op (str): The operator's name, for the error message.
        **tensors: The tensor arguments by name (``None`` ones skipped); the
            first one sets the device.

    Raises:
        ValueError: A tensor is on another device than the first, named.
    """
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(
                f'{op}: {name} is on {t.device} but {first} is on {device}; '
                'move every tensor argument to one device')
    if device is not None and device.type == 'cuda':
        return torch.cuda.device(device)
    return contextlib.nullcontext()
