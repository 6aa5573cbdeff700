"""Loading official and MMDetection checkpoints into our backbones.

One module owns this so ``init_weights`` of every backbone and the
command-line converter in ``tools/`` behave the same:

* files are read through MMEngine's
  :meth:`~mmengine.runner.CheckpointLoader.load_checkpoint`, so local paths,
  ``https://``, ``open-mmlab://``, ``torchvision://`` and the other schemes
  MMDetection users know all work;
* files are unpickled with ``weights_only=True`` (the loaders
  :mod:`mila_det.utils.weights` registers with MMEngine pass it explicitly):
  a file that holds other objects is refused with an error naming the class,
  never retried unsafely (:func:`load_checkpoint_file` says how to allow a
  class on purpose). Classes are allowed only inside a
  ``torch.serialization.safe_globals`` block around each load, never added
  to torch's global list;
* the backbone's tensors are found under ``state_dict`` (MMDetection),
  ``model`` (ImageNet releases) or at the top level, and a ``backbone.``
  prefix is stripped;
* tensors unused by design (a classifier, derived tables) are dropped; any
  other key that does not fit the backbone is an error that names the
  counts, the first keys and the known arch the checkpoint does fit, unless
  partial loading is asked for with ``strict=False``.
"""
import functools
import importlib
import logging
import os
import pickle
import re
from typing import (IO, Any, Callable, Dict, Iterable, List, NamedTuple,
                    Optional, Sequence, Tuple, Union)

import torch
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

StateDict = Dict[str, Tensor]
SafeGlobal = Union[str, Callable, Tuple[Callable, str]]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the model.

    Attributes:
        path (str): The checkpoint as it was named.
        blocked (list[str]): Globals the weights-only unpickler refused
            (empty when the error is of another kind).
    """

    def __init__(self, message: str, path: str,
                 blocked: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.path = path
        self.blocked = list(blocked)


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did: key names, in checkpoint order
    (``missing`` and ``fresh`` in the module's order).

    Attributes:
        loaded: Tensors copied into the module.
        missing: Module keys the checkpoint lacks (only with
            ``strict=False``).
        unexpected: Checkpoint keys the module lacks (only with
            ``strict=False``).
        ignored: Checkpoint keys unused by design (``ignore`` patterns, and
            ``optional`` keys the module does not have).
        fresh: ``optional`` module keys the checkpoint lacks; they keep their
            initialisation (an ImageNet file has no output norms).
        mismatched: Keys of both whose shapes differ (only with
            ``strict=False``; not loaded).
    """
    loaded: List[str]
    missing: List[str]
    unexpected: List[str]
    ignored: List[str]
    fresh: List[str]
    mismatched: List[str]


# ---------------------------------------------------------------- reading
def _resolve_global(name: Union[str, Callable]) -> Callable:
    """``'package.module.Class'`` -> the object (objects pass through)."""
    if not isinstance(name, str):
        return name
    parts = name.split('.')
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module('.'.join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ValueError(f'safe_globals: cannot import {name!r} (give the full '
                     "dotted name, e.g. 'argparse.Namespace')")


def _checkpoint_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as MMEngine checkpoints use it: only to rebuild the
    statistics methods a pickled ``HistoryBuffer`` keeps. Anything else is
    refused, so allowing it does not open ``getattr`` to arbitrary
    objects."""
    from mmengine.logging import HistoryBuffer
    if (isinstance(obj, HistoryBuffer) or obj is HistoryBuffer) and \
            not name.startswith('_') and callable(getattr(HistoryBuffer, name,
                                                          None)):
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({type(obj).__name__}, {name!r}); only '
        'HistoryBuffer methods are allowed')


@functools.lru_cache(maxsize=1)
def mmengine_safe_globals() -> Tuple[SafeGlobal, ...]:
    """The non-tensor classes MMEngine's own checkpoints pickle.

    A checkpoint written by MMEngine's runner (``--resume``, ``load_from``,
    a released MMDetection model) keeps, besides tensors, the message hub's
    ``HistoryBuffer`` objects with numpy arrays, dtypes and scalars inside,
    and ``getattr`` calls that rebuild a buffer's statistics methods
    (allowed for ``HistoryBuffer`` methods only).

    Returns:
        tuple: Entries for ``torch.serialization.safe_globals``.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer
    try:
        multiarray = np._core.multiarray
    except AttributeError:  # numpy < 2
        multiarray = np.core.multiarray
    dtype_classes = sorted(
        {type(np.dtype(c)) for c in '?bBhHiIlLqQefdgFDGUSO'},
        key=lambda c: c.__name__)
    return (HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
            multiarray.scalar, *dtype_classes,
            (_checkpoint_getattr, 'builtins.getattr'))


def allowed_globals(extra: Sequence[SafeGlobal] = ()
                    ) -> 'torch.serialization.safe_globals':
    """A block inside which weights-only unpickling accepts MMEngine's
    checkpoint classes (:func:`mmengine_safe_globals`) and ``extra``
    (classes, functions or their dotted names).

    Once the block ends, torch's allow-list is what it was before: the
    block adds (and then removes) only entries that were not on it, so
    classes the user allowed process-wide stay allowed.
    """
    present = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals(
        [g for g in (*mmengine_safe_globals(),
                     *(g if isinstance(g, tuple) else _resolve_global(g)
                       for g in extra))
         if g not in present])


def weights_only_load(source: Union[str, IO[bytes]],
                      map_location: Any = 'cpu',
                      safe_globals: Sequence[SafeGlobal] = ()) -> Any:
    """``torch.load(source, weights_only=True)`` with MMEngine's checkpoint
    classes and ``safe_globals`` allowed for this call only.

    Args:
        source (str | file): A local file or an open binary file.
        map_location: As for :func:`torch.load`. Defaults to ``'cpu'``.
        safe_globals (Sequence): Further classes to allow (see
            :func:`allowed_globals`). Defaults to ().
    """
    with allowed_globals(safe_globals):
        return torch.load(source, map_location=map_location,
                          weights_only=True)


def _unpickler_reason(message: str) -> str:
    """The weights-only unpickler's own sentence out of torch's long
    message (which also suggests ``weights_only=False``; we do not)."""
    found = re.search(r'WeightsUnpickler error: ([^\n]+)', message)
    if found:
        return found.group(1).strip()
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    useful = [ln for ln in lines if 'weights_only' not in ln and
              'Weights only load failed' not in ln and
              'documentation of torch.load' not in ln]
    return (useful or lines or ['unreadable'])[-1]


def _refused(path: str, err: Exception) -> CheckpointError:
    """The error for a file the weights-only unpickler would not read."""
    message = str(err)
    blocked = re.findall(
        r'GLOBAL (\S+) was not an allowed global|'
        r'unsupported GLOBAL (\S+) whose module', message)
    names = [a or b for a, b in blocked]
    if not names:
        return CheckpointError(
            f'{path} is not a checkpoint that can be read safely '
            f'({_unpickler_reason(message)}). Check that the file is '
            'complete (not an interrupted download or an HTML error page) '
            'and was written by torch.save.', path)
    listed = ', '.join(names)
    return CheckpointError(
        f'{path} holds pickled objects besides tensors and weights-only '
        f'loading refused {listed}. Pretrained weights are always read '
        'with weights_only=True, so no code from the file runs. If you '
        'trust this file, allow exactly that class: add '
        f'safe_globals={names!r} to the backbone\'s init_cfg (dict('
        "type='Pretrained', checkpoint=..., safe_globals=[...])) or wrap "
        f'the call in `with torch.serialization.safe_globals([{listed}]):` '
        '(further classes, if any, are named one at a time). '
        'Or load it once as trusted and re-save only the tensors: '
        "torch.save({'model': ckpt['model']}, 'clean.pth').", path, names)


def load_checkpoint_file(path: Optional[str],
                         safe_globals: Sequence[Union[str, Callable]] = ()
                         ) -> Any:
    """Read a checkpoint onto the CPU, weights only, from any scheme.

    Goes through :meth:`mmengine.runner.CheckpointLoader.load_checkpoint`,
    so ``path`` may be a local file or an ``https://``, ``open-mmlab://``,
    ``torchvision://``, ``s3://``... address. Addresses are served by the
    loaders of :mod:`mila_det.utils.weights`: a copy in ``data/pretrained/``
    wins, downloads go once into torch.hub's cache. Unpickling is
    weights-only: tensors, plain containers, numbers and strings load (and
    the few classes of MMEngine's own checkpoints); anything else is
    refused.

    Args:
        path (str, optional): Where the checkpoint is.
        safe_globals (Sequence[str | callable]): Classes or functions (or
            their dotted names) to allow for this file only, for trusted
            files that pickle more than tensors. Defaults to ().

    Returns:
        The loaded object (normally a dict).

    Raises:
        ValueError: ``path`` is empty.
        FileNotFoundError: a local ``path`` does not exist (the message says
            where it was expected).
        CheckpointError: the file is not a checkpoint, or pickles a class
            that is not allow-listed (the message names it and says how to
            allow it), or a download failed (the message names the address
            and the local path to use instead).
    """
    if path is None or not str(path).strip():
        raise ValueError(
            'pretrained checkpoint path is empty: set init_cfg=dict('
            "type='Pretrained', checkpoint='path/to/file.pth') or "
            'init_cfg=None to start from random weights')
    path = str(path)
    if '://' not in path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f'pretrained checkpoint not found: {path} (looked in '
                f'{os.path.abspath(path)}). Download it there, point the '
                "config's `pretrained` variable at it, or pass --cfg-options "
                'model.backbone.init_cfg=None to train from scratch.')
    try:
        with allowed_globals(safe_globals):
            return CheckpointLoader.load_checkpoint(
                path, map_location='cpu', logger='current')
    except CheckpointError:  # a failed download says what to do itself
        raise
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except (EOFError, RuntimeError) as err:  # empty or truncated archives
        reason = (str(err).strip().splitlines()[0] if str(err).strip() else
                  'the data ends too early')
        raise CheckpointError(
            f'{path} is not a readable checkpoint ({type(err).__name__}: '
            f'{reason}). Check that the file is complete.', path) from err


def select_state_dict(checkpoint: Any, path: str = '<checkpoint>',
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


# ---------------------------------------------------------------- fitting
def _short_list(keys: Sequence[str], limit: int = 5) -> str:
    if not keys:
        return 'none'
    shown = ', '.join(keys[:limit])
    return shown + (f', ... (+{len(keys) - limit} more)'
                    if len(keys) > limit else '')


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda key: any(p.fullmatch(key) for p in compiled)


class _Mismatch(NamedTuple):
    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]
    extra: List[str]   # optional keys of the checkpoint the module lacks
    fresh: List[str]   # optional keys of the module the checkpoint lacks


def _compare(state: Dict[str, torch.Size], own: Dict[str, torch.Size],
             optional: Callable[[str], bool]) -> _Mismatch:
    """How the checkpoint's keys and shapes differ from the module's."""
    absent = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    return _Mismatch(
        missing=[k for k in absent if not optional(k)],
        unexpected=[k for k in extra if not optional(k)],
        mismatched=[k for k in state if k in own and state[k] != own[k]],
        extra=[k for k in extra if optional(k)],
        fresh=[k for k in absent if optional(k)])


def _arch_owner(cls: type) -> Optional[type]:
    """The class that defines the ``arch_zoo`` ``cls`` builds from."""
    for base in cls.__mro__:
        if base.__dict__.get('arch_zoo'):
            return base
    return None


def _named_archs(owner: type) -> Dict[str, dict]:
    """One name per distinct setting of ``owner.arch_zoo`` (the longest
    alias: 'small' rather than 's')."""
    names: Dict[str, dict] = {}
    for alias, settings in owner.arch_zoo.items():
        same = [n for n, s in names.items() if s == settings]
        if not same:
            names[alias] = settings
        elif len(alias) > len(same[0]):
            names[alias] = names.pop(same[0])
    return names


class _ScheduleOnCPU(TorchFunctionMode):
    """Inside ``torch.device('meta')``: keeps ``torch.linspace`` on the CPU,
    because constructors read it back as numbers (the stochastic-depth
    schedule); every other tensor goes to the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace and kwargs.get('device') is None:
            kwargs['device'] = 'cpu'
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _arch_shapes(owner: type, arch: str) -> Dict[str, torch.Size]:
    """Key -> shape of ``owner(arch=arch)``'s state dict, built on the meta
    device (no memory, no init cost), on the CPU if a constructor needs
    real values; cached, do not modify."""
    try:
        with torch.device('meta'), _ScheduleOnCPU():
            model = owner(arch=arch)
    except (NotImplementedError, RuntimeError):
        model = owner(arch=arch)
    return {k: v.shape for k, v in model.state_dict().items()}


def fitting_archs(cls: type, state: Dict[str, torch.Size],
                  optional: Iterable[str] = ()) -> List[str]:
    """Names of ``cls``'s known archs whose keys and shapes ``state`` fits.

    Args:
        cls (type): A backbone class with an ``arch_zoo``.
        state (dict): Checkpoint key -> shape, unused keys already dropped.
        optional (Iterable[str]): Patterns of keys that may be absent or
            extra (output norms). Defaults to ().

    Returns:
        list[str]: e.g. ``['small']``; empty when none fits or ``cls`` has
        no ``arch_zoo``.
    """
    owner = _arch_owner(cls)
    if owner is None:
        return []
    is_optional = _matcher(optional)
    fits = []
    for name in _named_archs(owner):
        diff = _compare(state, _arch_shapes(owner, name), is_optional)
        if not (diff.missing or diff.unexpected or diff.mismatched):
            fits.append(name)
    return fits


def _arch_of(module: nn.Module) -> str:
    owner = _arch_owner(type(module))
    settings = getattr(module, 'arch_settings', None)
    if owner is not None and settings is not None:
        for name, known in _named_archs(owner).items():
            if known == settings:
                return f"arch '{name}'"
        return 'a custom arch'
    return 'this module'


def _misfit_message(module: nn.Module, path: str, diff: _Mismatch,
                    state: StateDict, own: StateDict,
                    optional: Iterable[str]) -> str:
    name = type(module).__name__
    parts = [f'{path} does not fit this {name} ({_arch_of(module)}):']
    if diff.missing:
        parts.append(f'{len(diff.missing)} missing keys '
                     f'({_short_list(diff.missing)});')
    if diff.unexpected:
        parts.append(f'{len(diff.unexpected)} unexpected keys '
                     f'({_short_list(diff.unexpected)});')
    if diff.mismatched:
        key = diff.mismatched[0]
        parts.append(f'{len(diff.mismatched)} of another shape (first '
                     f'{key!r}: {tuple(state[key].shape)} in the checkpoint, '
                     f'{tuple(own[key].shape)} here; the checkpoint is of '
                     'another architecture);')
    fits = fitting_archs(type(module),
                         {k: v.shape for k, v in state.items()}, optional)
    owner = _arch_owner(type(module))
    if fits:
        parts.append(f'it is a checkpoint of {owner.__name__} arch '
                     f"{fits[0]!r}: build the backbone with arch={fits[0]!r} "
                     'or give the checkpoint of this arch.')
    elif owner is not None:
        parts.append(f'it fits none of the known {owner.__name__} archs '
                     f'({", ".join(_named_archs(owner))}).')
    parts.append("To load only the tensors that fit, on purpose, use "
                 "init_cfg=dict(type='Pretrained', checkpoint=..., "
                 'strict=False).')
    return ' '.join(parts)


def load_pretrained(module: nn.Module,
                    path: str,
                    ignore: Iterable[str] = (),
                    convert: Optional[Callable[[StateDict], StateDict]] = None,
                    prefix: str = 'backbone.',
                    optional: Iterable[str] = (),
                    strict: bool = True,
                    safe_globals: Sequence[Union[str, Callable]] = ()
                    ) -> LoadReport:
    """Load a pretrained checkpoint into ``module`` and log one report.

    Args:
        module (nn.Module): The backbone to fill.
        path (str): Checkpoint file or address (see
            :func:`load_checkpoint_file`).
        ignore (Iterable[str]): Regular expressions (full match) of
            checkpoint keys the module does not use by design (a classifier
            head, derived tables); they are dropped silently.
            Defaults to ().
        convert (callable, optional): Renames or reshapes the state dict
            before matching (the model's converter). Defaults to None.
        prefix (str): Prefix of the backbone's keys inside a detector
            checkpoint. Defaults to ``'backbone.'``.
        optional (Iterable[str]): Patterns of keys that may be absent from
            the checkpoint (left at their init) or extra in it (dropped):
            the output norms, which ImageNet files lack. Defaults to ().
        strict (bool): Refuse a checkpoint with any other missing,
            unexpected or reshaped key. False loads what fits and logs the
            rest at WARNING. Defaults to True.
        safe_globals (Sequence[str | callable]): Passed to
            :func:`load_checkpoint_file`. Defaults to ().

    Returns:
        LoadReport: The keys loaded, missing, unexpected, ignored, left
        fresh and of another shape.

    Raises:
        FileNotFoundError, ValueError, CheckpointError: see
            :func:`load_checkpoint_file`.
        CheckpointError: no tensor fits the module; or, with ``strict``,
            some key does not fit (the message names the counts, the first
            keys and the arch the checkpoint fits, if any).
    """
    name = type(module).__name__
    state = select_state_dict(load_checkpoint_file(path, safe_globals), path,
                              prefix)
    if convert is not None:
        state = convert(state)
    is_ignored = _matcher(ignore)
    ignored = [k for k in state if is_ignored(k)]
    state = {k: v for k, v in state.items() if not is_ignored(k)}
    own = module.state_dict()
    diff = _compare({k: v.shape for k, v in state.items()},
                    {k: v.shape for k, v in own.items()}, _matcher(optional))
    loaded = [k for k in state if k in own and k not in diff.mismatched]
    if not loaded:
        first = next(iter(state), '<none>')
        raise CheckpointError(
            f'{path}: none of its {len(state)} tensors belongs to {name} '
            f'(first key {first!r}); is it a checkpoint of another model?',
            path)
    if strict and (diff.missing or diff.unexpected or diff.mismatched):
        raise CheckpointError(
            _misfit_message(module, path, diff, state, own, optional), path)
    module.load_state_dict({k: state[k] for k in loaded}, strict=False)
    partial = bool(diff.missing or diff.unexpected or diff.mismatched)
    message = (f'{name}: loaded {len(loaded)}/{len(own)} tensors from {path}'
               f'; {len(diff.fresh)} left at their init by design '
               f'({_short_list(diff.fresh)}); '
               f'{len(ignored) + len(diff.extra)} unused by design')
    if partial:
        message += (f'; strict=False: missing {len(diff.missing)} '
                    f'({_short_list(diff.missing)}), unexpected '
                    f'{len(diff.unexpected)} '
                    f'({_short_list(diff.unexpected)}), of another shape '
                    f'{len(diff.mismatched)} '
                    f'({_short_list(diff.mismatched)})')
    print_log(message, logger='current',
              level=logging.WARNING if partial else logging.INFO)
    return LoadReport(loaded, diff.missing, diff.unexpected,
                      ignored + diff.extra, diff.fresh, diff.mismatched)
