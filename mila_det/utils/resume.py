"""Finding a checkpoint to resume from that can actually be read.

MMEngine resumes from the file ``<work_dir>/last_checkpoint`` names. After
a crash that file can name a checkpoint that was cut short (a node lost
while writing, from tools that do not write atomically), and resuming ends
in a raw ``PytorchStreamReader`` traceback. :func:`find_resume_checkpoint`
instead tries the checkpoints of the work dir newest first, warns about
each unreadable one by name, and returns the newest readable one.
"""
import glob
import os
import os.path as osp
import re
import zipfile
from typing import Callable, List, Optional, Tuple

import torch

from .atomic_io import TMP_SUFFIX
from .checkpoint import allowed_globals

CHECKPOINT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')


class ResumeError(RuntimeError):
    """No checkpoint to resume from could be read."""


def checkpoint_files(work_dir: str) -> List[str]:
    """The ``iter_<n>.pth`` and ``epoch_<e>.pth`` files of ``work_dir``,
    and of the folder ``last_checkpoint`` points into when that is another
    (a checkpoint hook's ``out_dir``), newest first: the one
    ``last_checkpoint`` names (if it is there), then the others by
    modification time, newest first."""
    named = last_checkpoint_entry(work_dir)
    folders = {osp.abspath(work_dir)}
    if named is not None and osp.isfile(named):
        folders.add(osp.dirname(osp.abspath(named)))
    found = [p for folder in sorted(folders)
             for p in glob.glob(osp.join(folder, '*.pth'))
             if CHECKPOINT_NAME.match(osp.basename(p)) and osp.isfile(p)]
    found.sort(key=lambda p: os.stat(p).st_mtime_ns, reverse=True)
    if named is not None:
        for path in found:
            if osp.abspath(path) == osp.abspath(named):
                found.remove(path)
                found.insert(0, path)
                break
    return found


def last_checkpoint_entry(work_dir: str) -> Optional[str]:
    """The path ``<work_dir>/last_checkpoint`` names, None without one."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None
    with open(pointer) as f:
        path = f.read().strip()
    return path or None


def newest_checkpoint(work_dir: str) -> Optional[str]:
    """The newest checkpoint file of ``work_dir`` without reading it (the
    one ``last_checkpoint`` names if present), or None."""
    files = checkpoint_files(work_dir)
    return files[0] if files else None


def _non_finite_weights(state_dict: dict) -> List[str]:
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())]


def unreadable_reason(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when
    it can.

    The file must be a complete zip archive whose every member matches its
    CRC (a truncated or bit-flipped file fails here), unpickle under
    ``weights_only=True`` (with the classes ``mila_det`` allows for MMEngine
    checkpoints), hold ``meta`` and ``state_dict``, and have finite
    weights. The tensors are memory-mapped, not copied.
    """
    if not osp.isfile(path):
        return 'no such file'
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f'member {bad} fails its CRC check (the file is damaged)'
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f'not a complete checkpoint archive ({err})'
    try:
        with allowed_globals():  # MMEngine's checkpoint classes
            checkpoint = torch.load(path, map_location='cpu',
                                    weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure)
        return f'cannot be loaded ({type(err).__name__}: {err})'
    if not isinstance(checkpoint, dict) or not {
            'meta', 'state_dict'} <= set(checkpoint):
        return 'not an MMEngine checkpoint (no meta / state_dict)'
    bad_weights = _non_finite_weights(checkpoint['state_dict'])
    if bad_weights:
        return (f'{len(bad_weights)} weight tensors hold NaN/inf, e.g. '
                f'{bad_weights[0]}')
    return None


def stray_temporary_files(work_dir: str) -> List[str]:
    """Temporary files an interrupted atomic write left in ``work_dir``."""
    return sorted(glob.glob(osp.join(work_dir, f'.*{TMP_SUFFIX}')))


def find_resume_checkpoint(
        work_dir: str, warn: Callable[[str], None] = print
) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest readable checkpoint of ``work_dir`` and the newer ones
    that were passed over.

    Args:
        work_dir (str): The run's work dir.
        warn (callable): Called with one line for every checkpoint passed
            over and every stray temporary file removed. Defaults to print.

    Returns:
        tuple: ``(path, skipped)``: ``path`` is None when the work dir holds
        no checkpoint at all; ``skipped`` lists ``(path, reason)`` for the
        newer checkpoints that could not be read.

    Raises:
        ResumeError: Checkpoints exist but none can be read.
    """
    for stray in stray_temporary_files(work_dir):
        warn(f'removing {stray}: a checkpoint write that never finished')
        try:
            os.remove(stray)
        except FileNotFoundError:  # another rank removed it
            pass
    named = last_checkpoint_entry(work_dir)
    skipped: List[Tuple[str, str]] = []
    if named is not None and not osp.isfile(named):
        skipped.append((named, 'named in last_checkpoint but missing'))
        warn(f'cannot resume from {named} (named in last_checkpoint): the '
             'file is missing; trying the older checkpoints')
    for path in checkpoint_files(work_dir):
        reason = unreadable_reason(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
        warn(f'cannot resume from {path}: {reason}; trying the next older '
             'checkpoint')
    if skipped and any(osp.isfile(p) for p, _ in skipped):
        listing = '\n'.join(f'  {p}: {r}' for p, r in skipped)
        raise ResumeError(f'no checkpoint in {work_dir} can be resumed '
                          f'from:\n{listing}')
    return None, skipped
