"""Checks run before a training or test job starts, so that a missing file
fails at once with a message saying where it is expected, rather than deep
inside a data loader or after minutes of model building.

:func:`check_inputs` reports every missing input in one message: the data
first, then the checkpoints. A checkpoint given by address counts as present
when a local copy or the cached download exists (no request is made); else,
when the data is there, it is downloaded now (so a failed download stops the
job before anything is built), and when the data is missing too, the message
says where the file would come from and where a copy may be put instead.
"""
import os
from typing import Iterator, List, Optional, Sequence

from mmengine.config import Config, ConfigDict

from .weights import (DownloadError, cache_path, fetch, find_copy,
                      is_address, local_path)


def _leaf_datasets(cfg: dict) -> Iterator[dict]:
    """Yield the dataset configs that read files, through wrappers such as
    ``RepeatDataset`` (``dataset``) and ``ConcatDataset`` (``datasets``)."""
    if 'dataset' in cfg and isinstance(cfg['dataset'], dict):
        yield from _leaf_datasets(cfg['dataset'])
    elif 'datasets' in cfg and isinstance(cfg['datasets'], (list, tuple)):
        for sub in cfg['datasets']:
            yield from _leaf_datasets(sub)
    else:
        yield cfg


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def missing_dataset_files(dataset_cfg: dict) -> List[str]:
    """Annotation files and image folders a dataset config names that do not
    exist (local paths only; remote backends are not checked)."""
    missing = []
    for ds in _leaf_datasets(dataset_cfg):
        if ds.get('backend_args'):
            continue
        root = ds.get('data_root') or ''
        ann = ds.get('ann_file')
        if ann and not os.path.isfile(_resolve(root, ann)):
            missing.append(_resolve(root, ann))
        prefix = ds.get('data_prefix') or {}
        for key in ('img', 'img_path'):
            if prefix.get(key):
                folder = _resolve(root, prefix[key])
                if not os.path.isdir(folder):
                    missing.append(folder)
    return missing


def _data_problems(cfg: Config, splits: Sequence[str]) -> Optional[str]:
    lines = []
    for split in splits:
        loader = cfg.get(split)
        if not isinstance(loader, (dict, ConfigDict)) or \
                'dataset' not in loader:
            continue
        for path in missing_dataset_files(loader['dataset']):
            lines.append(f'  {split}: {path}')
    if not lines:
        return None
    return ('dataset files not found (paths relative to '
            f'{os.getcwd()}):\n' + '\n'.join(lines) +
            '\nPlace COCO 2017 in MMDetection\'s layout under data/coco/ '
            '(annotations/instances_train2017.json, train2017/, '
            'annotations/instances_val2017.json, val2017/), or point the '
            'config elsewhere with --cfg-options '
            'train_dataloader.dataset.data_root=... '
            'val_dataloader.dataset.data_root=... '
            'test_dataloader.dataset.data_root=...')


def check_data(cfg: Config, splits=('train_dataloader', 'val_dataloader')
               ) -> None:
    """Raise ``FileNotFoundError`` naming every expected data file that is
    missing for the given dataloaders of ``cfg``."""
    problem = _data_problems(cfg, splits)
    if problem:
        raise FileNotFoundError(problem)


def pretrained_checkpoint(cfg: Config) -> Optional[str]:
    """The backbone's ``Pretrained`` checkpoint in ``cfg``, if any."""
    backbone = cfg.get('model', {}).get('backbone', {}) or {}
    init = backbone.get('init_cfg') or {}
    if not isinstance(init, dict) or init.get('type') != 'Pretrained':
        return None
    return init.get('checkpoint') or None


def _checkpoint_problem(path: str, what: str, download: bool) -> Optional[str]:
    """None if ``path`` is there (or was just downloaded), else why not."""
    path = str(path)
    if is_address(path):
        try:
            if find_copy(path):
                return None
        except ValueError as err:  # an address that names no file
            return f'{what}: {err}'
        if not download:
            return (f'{what} not downloaded yet: {path} will be saved as '
                    f'{cache_path(path)} on first use. Without network '
                    f'access, put a copy at {local_path(path)} instead.')
        if os.environ.get('LOCAL_RANK', '0') != '0':
            return None  # local rank 0 downloads; the loader waits for it
        try:
            fetch(path)
        except DownloadError as err:
            return f'{what}: {err}'
        return None
    if '://' in path:  # other schemes are checked when they load
        return None
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(full):
        return None
    return f'{what} not found: {path} (looked in {full}).'


def check_pretrained(cfg: Config, download: bool = True) -> None:
    """Raise ``FileNotFoundError`` if the backbone's ``Pretrained``
    checkpoint is a local path that does not exist, or an address with no
    local copy, no cached download and (``download=True``) a download that
    fails."""
    problem = _pretrained_problem(cfg, download)
    if problem:
        raise FileNotFoundError(problem)


def _pretrained_problem(cfg: Config, download: bool) -> Optional[str]:
    path = pretrained_checkpoint(cfg)
    if path is None:
        return None
    problem = _checkpoint_problem(path, 'pretrained backbone checkpoint',
                                  download)
    if problem is None:
        return None
    if is_address(path):
        return problem + (' To train from scratch instead: --cfg-options '
                          'model.backbone.init_cfg=None')
    return problem + (' Download the official ImageNet-1K weights there '
                      "(README, Pretrained backbones), set the config's "
                      '`pretrained` variable, or train from scratch with '
                      '--cfg-options model.backbone.init_cfg=None')


def check_inputs(cfg: Config,
                 splits: Sequence[str] = ('train_dataloader',
                                          'val_dataloader'),
                 pretrained: bool = True,
                 checkpoint: Optional[str] = None) -> None:
    """Check a job's data and checkpoints; report all that is missing.

    Args:
        cfg (Config): The job's config.
        splits (Sequence[str]): Dataloaders whose files must exist.
            Defaults to the training and validation loaders.
        pretrained (bool): Check the backbone's ``Pretrained`` checkpoint
            (not when resuming). Defaults to True.
        checkpoint (str, optional): A checkpoint the job loads (a path or an
            address, as ``tools/test.py`` takes). Defaults to None.

    Raises:
        FileNotFoundError: one message with every missing input, the data
            first. Addresses are downloaded (into torch.hub's cache) only
            when the data is present.
    """
    problems = [_data_problems(cfg, splits)]
    download = problems[0] is None
    if pretrained:
        problems.append(_pretrained_problem(cfg, download))
    if checkpoint is not None:
        problems.append(_checkpoint_problem(checkpoint, 'checkpoint',
                                            download))
    problems = [p for p in problems if p]
    if problems:
        raise FileNotFoundError('\n'.join(problems))
