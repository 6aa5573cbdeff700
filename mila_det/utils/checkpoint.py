"""Loading official and MMDetection checkpoints into our backbones.

One module owns this so ``init_weights`` of every backbone and the
command-line converter in ``tools/`` behave the same: files are read with
``weights_only=True`` when they allow it, the backbone's tensors are found
under ``model`` (ImageNet releases), ``state_dict`` (MMDetection) or at the
top level, a ``backbone.`` prefix is stripped, derived or head-only tensors
are dropped, and anything that does not fit fails with the file and the
first offending key.
"""
import logging
import os
import pickle
import re
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional

import torch
from mmengine.logging import print_log
from torch import Tensor, nn

StateDict = Dict[str, Tensor]


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did: key names, in checkpoint order."""
    loaded: List[str]
    missing: List[str]
    unexpected: List[str]
    ignored: List[str]


def load_checkpoint_file(path: Optional[str]) -> dict:
    """Read a checkpoint file onto the CPU, preferring ``weights_only=True``.

    Files holding only tensors and plain containers load safely. A file that
    also pickles other objects (an optimizer config, a yacs node) loads with
    ``weights_only=False`` after a warning that names it: only do that with
    files you trust.
    """
    if path is None or not str(path).strip():
        raise ValueError(
            'pretrained checkpoint path is empty: set init_cfg=dict('
            "type='Pretrained', checkpoint='path/to/file.pth') or "
            'init_cfg=None to start from random weights')
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'pretrained checkpoint not found: {path} (looked in '
            f'{os.path.abspath(path)}). Download it there, point the '
            "config's `pretrained` variable at it, or pass --cfg-options "
            'model.backbone.init_cfg=None to train from scratch.')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err) else 'objects'
        print_log(
            f'{path} holds more than tensors ({reason[:160]}); loading it '
            'with weights_only=False. Only load files you trust.',
            logger='current', level=logging.WARNING)
        return torch.load(path, map_location='cpu', weights_only=False)


def select_state_dict(checkpoint: dict, path: str = '<checkpoint>',
                      prefix: str = 'backbone.') -> StateDict:
    """Find the backbone's tensors in a loaded checkpoint.

    Looks under ``state_dict`` then ``model``, else the top level; drops a
    ``module.`` (DataParallel) prefix; if any key starts with ``prefix``
    (a detector checkpoint), keeps only those keys, without the prefix.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'{path}: expected a dict of tensors, got '
                        f'{type(checkpoint).__name__}')
    state = checkpoint
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    state = {(k[7:] if k.startswith('module.') else k): v
             for k, v in state.items() if isinstance(v, Tensor)}
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()
                 if k.startswith(prefix)}
    if not state:
        raise ValueError(f'{path}: no tensors found (looked under '
                         "'state_dict', 'model' and the top level)")
    return state


def _short_list(keys: List[str], limit: int = 8) -> str:
    if not keys:
        return 'none'
    shown = ', '.join(keys[:limit])
    return shown + (f', ... (+{len(keys) - limit} more)'
                    if len(keys) > limit else '')


def load_pretrained(module: nn.Module,
                    path: str,
                    ignore: Iterable[str] = (),
                    convert: Optional[Callable[[StateDict], StateDict]] = None,
                    prefix: str = 'backbone.') -> LoadReport:
    """Load a pretrained checkpoint into ``module`` and log one report.

    Args:
        module (nn.Module): The backbone to fill.
        path (str): Checkpoint file.
        ignore (Iterable[str]): Regular expressions (full match) of keys the
            module does not use by design (a classifier head, derived
            tables); they are dropped and counted, not reported as
            unexpected.
        convert (callable, optional): Renames or reshapes the state dict
            before matching (the model's converter).
        prefix (str): Prefix of the backbone's keys inside a detector
            checkpoint. Defaults to ``'backbone.'``.

    Raises:
        FileNotFoundError / ValueError: missing or empty path, no tensors.
        RuntimeError: no key fits the module, or a shape differs (the
            message names the file and the first such key).
    """
    name = type(module).__name__
    state = select_state_dict(load_checkpoint_file(path), path, prefix)
    if convert is not None:
        state = convert(state)
    patterns = [re.compile(p) for p in ignore]
    ignored = [k for k in state if any(p.fullmatch(k) for p in patterns)]
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    own = module.state_dict()
    loaded = [k for k in state if k in own]
    if not loaded:
        first = next(iter(state), '<none>')
        raise RuntimeError(
            f'{path}: none of its {len(state)} tensors belongs to {name} '
            f'(first key {first!r}); is it a checkpoint of another model?')
    for key in loaded:
        if state[key].shape != own[key].shape:
            raise RuntimeError(
                f'{path}: {key!r} has shape {tuple(state[key].shape)} in the '
                f'checkpoint but {tuple(own[key].shape)} in this {name}; '
                'the checkpoint is of another architecture (check `arch`).')
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    module.load_state_dict({k: state[k] for k in loaded}, strict=False)
    print_log(
        f'{name}: loaded {len(loaded)}/{len(own)} tensors from {path}; '
        f'missing {len(missing)}: {_short_list(missing)}; '
        f'unexpected {len(unexpected)}: {_short_list(unexpected)}; '
        f'ignored {len(ignored)} unused by design',
        logger='current', level=logging.INFO)
    return LoadReport(loaded, missing, unexpected, ignored)


def _checkpoint_getattr(obj, name: str):
    """``getattr`` as MMEngine checkpoints use it: only to rebuild the
    statistics methods a pickled ``HistoryBuffer`` keeps. Anything else is
    refused, so the allow-list does not open ``getattr`` to arbitrary
    objects."""
    from mmengine.logging import HistoryBuffer
    if (isinstance(obj, HistoryBuffer) or obj is HistoryBuffer) and \
            not name.startswith('_') and callable(getattr(HistoryBuffer, name,
                                                          None)):
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({type(obj).__name__}, {name!r}); only '
        'HistoryBuffer methods are allowed')


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` (the default from torch 2.6)
    read MMEngine's own checkpoints for ``--resume`` and ``load_from``.

    They hold, besides tensors, the message hub's ``HistoryBuffer`` objects
    with numpy arrays and scalars inside. Exactly those classes are added to
    torch's allow-list (and ``getattr`` only for ``HistoryBuffer``
    methods); ``weights_only`` itself stays on for all other code.
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:  # torch < 2.4 loads with weights_only=False anyway
        return
    import numpy as np
    from mmengine.logging import HistoryBuffer
    try:
        multiarray = np._core.multiarray
    except AttributeError:  # numpy < 2
        multiarray = np.core.multiarray
    dtype_classes = {type(np.dtype(c)) for c in '?bBhHiIlLqQefdgFDGUSO'}
    add([HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
         multiarray.scalar, *dtype_classes,
         (_checkpoint_getattr, 'builtins.getattr')])
