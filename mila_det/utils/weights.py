"""Checkpoints by address: the official weights' table, a local copy that
wins, one download into torch.hub's cache, and MMEngine's loaders for
addresses and local files made weights-only.

The configs name the authors' official addresses (MILA: Han et al.,
"Demystify Mamba in Vision: A Linear Attention Perspective", NeurIPS 2024;
VMamba: Liu et al., "VMamba: Visual State Space Model", NeurIPS 2024). An
address resolves to a file name: the ``#name`` fragment if it has one, else
:data:`OFFICIAL_FILES` (the Tsinghua Cloud links end in ``/?dl=1`` and name no
file), else the last part of its path. That name is looked for, in order, in

1. :data:`LOCAL_DIRS` (``data/pretrained/`` under the working directory): a
   copy placed there by hand is used and the address is never contacted;
2. torch.hub's cache, ``<TORCH_HOME>/hub/checkpoints/``;

and otherwise downloaded into the cache: into a temporary file in the same
folder, checked (the full length arrived, the data is a torch file, not an
error page), then renamed. A failed or interrupted download leaves nothing
behind and raises :class:`DownloadError`, whose message names the address
and the local path to use instead.

:func:`register_checkpoint_loaders` (run by ``import mila_det``) registers,
through MMEngine's :class:`~mmengine.runner.CheckpointLoader` scheme table,
loaders for local files, ``http(s)://``, ``open-mmlab://`` and
``torchvision://`` that do the above and unpickle with ``weights_only=True``,
allowing MMEngine's checkpoint classes only for the duration of each load.
So ``init_cfg`` addresses, ``load_from``, ``--resume``, ``tools/test.py CONFIG
URL`` and MMDetection's ``DetInferencer(weights=URL)`` all read weights only.
"""
import http.client
import os
import os.path as osp
import posixpath
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader

from .checkpoint import CheckpointError, weights_only_load

_TSINGHUA = 'https://cloud.tsinghua.edu.cn/f/'
_VMAMBA = 'https://github.com/MzeroMiko/VMamba/releases/download/'

#: Official address -> the file name it is cached and looked for under.
OFFICIAL_FILES: Dict[str, str] = {
    # MILA (MLLA) ImageNet-1K
    _TSINGHUA + '7a19712877cb4242889c/?dl=1': 'MLLA_T.pth',
    _TSINGHUA + '0e5d0b1409d540aaa80c/?dl=1': 'MLLA_S.pth',
    _TSINGHUA + '91c85c5a1061496d8796/?dl=1': 'MLLA_B.pth',
    # VMamba ImageNet-1K
    **{_VMAMBA + '%23v2cls/' + name: name for name in (
        'vssm1_tiny_0230s_ckpt_epoch_264.pth',
        'vssm_small_0229_ckpt_epoch_222.pth',
        'vssm_base_0229_ckpt_epoch_237.pth')},
    # VMamba COCO Mask R-CNN (MMDetection 3)
    **{_VMAMBA + '%23v2det/' + name: name for name in (
        'mask_rcnn_vssm_fpn_coco_tiny_ms_3x_s_epoch_31.pth',
        'mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth',
        'mask_rcnn_vssm_fpn_coco_small_ms_3x_epoch_32.pth',
        'mask_rcnn_vssm_fpn_coco_small_epoch_11.pth',
        'mask_rcnn_vssm_fpn_coco_base_epoch_11.pth')},
}

#: Folders (relative to the working directory, or absolute) searched for a
#: local copy before an address is contacted.
LOCAL_DIRS: Tuple[str, ...] = ('data/pretrained', )

_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


class DownloadError(CheckpointError):
    """A download that failed or was cut short; nothing was kept.

    Attributes:
        path (str): The address.
        local (str): Where a copy placed by hand would be used.
    """

    def __init__(self, message: str, url: str, local: str) -> None:
        super().__init__(message, url)
        self.local = local


def is_address(path: str) -> bool:
    """Whether ``path`` is an ``http://`` or ``https://`` address."""
    return str(path).startswith(('http://', 'https://'))


def _strip_fragment(url: str) -> Tuple[str, str]:
    base, _, fragment = url.partition('#')
    return base, fragment


def file_name(url: str) -> str:
    """The file name an address is cached and looked for under.

    Args:
        url (str): An ``http(s)://`` address, optionally ending in
            ``#name.pth``.

    Returns:
        str: The fragment, else the :data:`OFFICIAL_FILES` entry, else the
        last part of the address's path.

    Raises:
        ValueError: the address names no file (its path ends in ``/``) and
            is not in the table.
    """
    base, fragment = _strip_fragment(url)
    if fragment:
        return posixpath.basename(fragment)
    if base in OFFICIAL_FILES:
        return OFFICIAL_FILES[base]
    parts = urllib.parse.urlsplit(base)
    name = posixpath.basename(urllib.parse.unquote(parts.path))
    if not name or parts.query:
        # A query picks the file (``uc?id=...``): addresses that differ
        # only there would share one cache name.
        why = ('its path ends in "/"' if not name else
               f'its query {parts.query!r} picks the file')
        raise ValueError(
            f'{url} names no file ({why}), so it has no name to be cached '
            f"under: append one as a fragment, e.g. '{url}#model.pth'")
    return name


def local_path(url: str) -> str:
    """Where a copy of ``url`` placed by hand is used (the first of
    :data:`LOCAL_DIRS`), as an absolute path."""
    return osp.abspath(osp.join(LOCAL_DIRS[0], file_name(url)))


def cache_path(url: str, model_dir: Optional[str] = None) -> str:
    """``<model_dir or torch.hub's dir/checkpoints>/<file_name(url)>``."""
    folder = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    return osp.join(folder, file_name(url))


def find_copy(url: str, model_dir: Optional[str] = None) -> Optional[str]:
    """A local copy of ``url`` (from :data:`LOCAL_DIRS`) or its cached
    download, whichever is found first; None if neither exists. Makes no
    request."""
    for folder in LOCAL_DIRS:
        path = osp.join(folder, file_name(url))
        if osp.isfile(path):
            return path
    path = cache_path(url, model_dir)
    return path if osp.isfile(path) else None


def _looks_like_torch_file(path: str) -> bool:
    """A ``torch.save`` zip archive (complete: its directory is at the
    end) or a legacy pickle; an HTML error page is neither."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, 'rb') as f:
        return f.read(2) == b'\x80\x02'


def _failed(url: str, dst: str, reason: str) -> DownloadError:
    local = local_path(url)
    return DownloadError(
        f'could not download {url} ({reason}); nothing was saved in '
        f'{osp.dirname(dst)}. Without network access, fetch the file '
        f'elsewhere and put it at {local}: a copy there is used instead of '
        'the address. Or name a local file instead of the address.',
        url, local)


def download(url: str, dst: str, timeout: float = _TIMEOUT_S) -> str:
    """Download ``url`` to ``dst``, all or nothing.

    The data goes to a temporary file beside ``dst``, is checked (the
    length the server announced arrived; the file is a torch checkpoint),
    and is renamed to ``dst`` only then. On any failure, or an interrupt,
    the temporary file is removed.

    Args:
        url (str): The address (a ``#fragment`` is not sent).
        dst (str): The final path; its folder is created if needed.
        timeout (float): Seconds to wait for the server at each step.
            Defaults to 30.

    Returns:
        str: ``dst``.

    Raises:
        DownloadError: the request failed, the transfer stopped early or the
            data is not a checkpoint (the message names the address and the
            local path to use instead).
    """
    folder = osp.dirname(osp.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    base, _ = _strip_fragment(url)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(dst)}.',
                               suffix='.part', dir=folder)
    try:
        print_log(f'Downloading {url} to {dst}', logger='current')
        request = urllib.request.Request(
            base, headers={'User-Agent': 'mila_det'})
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(
                request, timeout=timeout) as response:
            expected = response.headers.get('Content-Length')
            received = 0
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it final
        if expected is not None and received != int(expected):
            raise _failed(url, dst, f'the transfer stopped after {received} '
                          f'of {int(expected)} bytes')
        if not _looks_like_torch_file(tmp):
            raise _failed(url, dst, 'the server sent something that is not '
                          'a torch checkpoint, e.g. an HTML page')
        os.replace(tmp, dst)
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = (f'HTTP {err.code} {err.reason}'
                  if isinstance(err, urllib.error.HTTPError) else
                  f'{type(err).__name__}: {err}')
        raise _failed(url, dst, reason) from None
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    print_log(f'Saved {url} as {dst} ({osp.getsize(dst)} bytes)',
              logger='current')
    return dst


def fetch(url: str, model_dir: Optional[str] = None) -> str:
    """The local file for ``url``: a copy in :data:`LOCAL_DIRS`, the cached
    download, or a new download into the cache (see :func:`download`)."""
    return find_copy(url, model_dir) or download(url,
                                                 cache_path(url, model_dir))


# ------------------------------------------- MMEngine's checkpoint loaders
def load_from_local(filename: str, map_location: Any = None) -> Any:
    """MMEngine's scheme ``''``: a local file, weights only."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return weights_only_load(filename, map_location)


def load_from_url(filename: str, map_location: Any = None,
                  model_dir: Optional[str] = None) -> Any:
    """MMEngine's schemes ``http://`` and ``https://``: the local copy or
    cached file, downloaded once if needed (by rank 0 of a distributed job;
    the others wait), read weights only."""
    rank, world_size = get_dist_info()
    if rank == 0:
        path = fetch(filename, model_dir)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = fetch(filename, model_dir)
    print_log(f'Reading {filename} from {path}', logger='current')
    return weights_only_load(path, map_location)


def load_from_openmmlab(filename: str, map_location: Any = None) -> Any:
    """``open-mmlab://NAME``: MMEngine's model list gives the address."""
    from mmengine.runner.checkpoint import (get_deprecated_model_names,
                                            get_external_models)
    name = filename.split('://', 1)[1]
    name = get_deprecated_model_names().get(name, name)
    target = get_external_models()[name]
    if is_address(target):
        return load_from_url(target, map_location)
    home = osp.expanduser(os.getenv(
        'MMENGINE_HOME',
        osp.join(os.getenv('XDG_CACHE_HOME', '~/.cache'), 'mmengine')))
    return load_from_local(osp.join(home, target), map_location)


def load_from_torchvision(filename: str, map_location: Any = None) -> Any:
    """``torchvision://NAME``: torchvision's model list gives the
    address."""
    from mmengine.runner.checkpoint import get_torchvision_models
    name = filename.split('://', 1)[1]
    return load_from_url(get_torchvision_models()[name], map_location)


def register_checkpoint_loaders() -> None:
    """Serve MMEngine's local, ``http(s)://``, ``open-mmlab://`` and
    ``torchvision://`` checkpoints with the loaders above (MMEngine's own
    read downloads with ``weights_only=False`` and name cache files after
    the address's path). Idempotent."""
    for prefixes, loader in (
            ('', load_from_local),
            (('http://', 'https://'), load_from_url),
            (('open-mmlab://', 'openmmlab://'), load_from_openmmlab),
            (('modelzoo://', 'torchvision://'), load_from_torchvision)):
        CheckpointLoader.register_scheme(prefixes, loader, force=True)
