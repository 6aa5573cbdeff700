"""The linear recurrence ``h_t = a_t * h_{t-1} + b_t`` in chunks, the core of
the selective scan's PyTorch path (:mod:`.chunk`) and of the exported scan
(:mod:`mila_det.ops._export`).

A sequential pass inside every chunk of about ``sqrt(L) / 2`` tokens, run
over all chunks and channels at once, a short pass over the chunk ends to
carry states across chunks, then a second pass inside every chunk from the
right start: ``~3 sqrt(L)`` tensor operations instead of ``L`` tiny ones.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor


# Above this many chunks the states carried across them are themselves
# solved by a chunked recurrence (two small ops per chunk cost more).
CARRY_LOOP_MAX = 32


def _chunk_size(length: int) -> int:
    """About ``sqrt(L) / 2`` tokens per chunk (at least 8)."""
    return max(8, (math.isqrt(max(length - 1, 0)) + 2) // 2)


def _chunk_end_states(a4: Tensor, b4: Tensor,
                      reverse: bool) -> Tuple[Tensor, Tensor]:
    """For ``a4, b4: [B, n_chunks, T, M]``: each chunk's end state from a
    zero start, and the product of its decays (``[B, n_chunks, M]`` both)."""
    steps = range(a4.shape[2])
    first, *rest = reversed(steps) if reverse else steps
    state = b4[:, :, first].clone()
    decay = a4[:, :, first].clone()
    for t in rest:
        state = torch.addcmul(b4[:, :, t], a4[:, :, t], state)
        decay.mul_(a4[:, :, t])
    return state, decay


def linear_recurrence(a: Tensor,
                      b: Tensor,
                      chunk: Optional[int] = None,
                      reverse: bool = False,
                      initial: Optional[Tensor] = None,
                      out: Optional[Tensor] = None) -> Tensor:
    """Solve ``h[t] = a[t] * h[t-1] + b[t]`` along the token axis.

    Three steps: each chunk's end state from a zero start (a sequential pass
    inside every chunk, all chunks at once), the states entering every chunk
    (a short pass over the chunks), then the states themselves (a second
    pass inside every chunk, now from the right start). Tokens outside the
    whole chunks are finished one by one.

    Args:
        a (Tensor): Decays ``[B, L, M]`` or ``[L, M]``, contiguous.
        b (Tensor): Inputs, same shape.
        chunk (int, optional): Tokens per chunk. Defaults to
            about ``sqrt(L) / 2`` (at least 8).
        reverse (bool): Run from the last token to the first,
            ``h[t] = a[t] * h[t+1] + b[t]``. Defaults to False.
        initial (Tensor, optional): The state before the first step
            (``[B, M]`` or ``[M]``). Defaults to zeros.
        out (Tensor, optional): Where to write the states; may be ``b``
            itself. Defaults to a new tensor.

    Returns:
        Tensor: The states ``h``, shaped like ``b``.
    """
    if a.shape != b.shape or a.dim() not in (2, 3):
        raise ValueError('linear_recurrence: a and b must share a shape '
                         f'[B, L, M] or [L, M]; got {tuple(a.shape)} and '
                         f'{tuple(b.shape)}')
    if a.dim() == 2:
        h = linear_recurrence(a[None], b[None], chunk, reverse,
                              None if initial is None else initial[None],
                              None if out is None else out[None])
        return h[0]
    batch, length, width = b.shape
    chunk = chunk or _chunk_size(length)
    n_chunks = length // chunk
    main = n_chunks * chunk
    # Forward: whole chunks first, then the tail; reverse: the mirror image.
    lo = length - main if reverse else 0
    tail = range(lo - 1, -1, -1) if reverse else range(main, length)
    h = torch.empty_like(b) if out is None else out
    state = (b.new_zeros(batch, width) if initial is None else
             initial.to(b.dtype).expand(batch, width))
    if n_chunks:
        a4 = a[:, lo:lo + main].view(batch, n_chunks, chunk, width)
        b4 = b[:, lo:lo + main].view(batch, n_chunks, chunk, width)
        h4 = h[:, lo:lo + main].view(batch, n_chunks, chunk, width)
        ends, decays = _chunk_end_states(a4, b4, reverse)
        starts = torch.empty_like(ends)  # the state entering each chunk
        if n_chunks > CARRY_LOOP_MAX:
            # The carry is a recurrence over the chunks: solve it the same
            # way rather than with one tiny step per chunk.
            after = linear_recurrence(decays, ends, reverse=reverse,
                                      initial=state)
            first, rest, shifted = ((-1, slice(None, -1), after[:, 1:])
                                    if reverse else
                                    (0, slice(1, None), after[:, :-1]))
            starts[:, first] = state
            starts[:, rest] = shifted
            state = after[:, 0 if reverse else -1]
        else:
            for c in (reversed(range(n_chunks)) if reverse
                      else range(n_chunks)):
                starts[:, c] = state
                state = torch.addcmul(ends[:, c], decays[:, c], state)
        steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
        prev = starts
        for t in steps:
            torch.addcmul(b4[:, :, t], a4[:, :, t], prev, out=h4[:, :, t])
            prev = h4[:, :, t]
    for t in tail:
        state = torch.addcmul(b[:, t], a[:, t], state)
        h[:, t] = state
    return h
