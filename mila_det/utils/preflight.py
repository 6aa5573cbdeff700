"""Checks run before a training or test job starts, so that a missing file
fails at once with a message saying where it is expected, rather than deep
inside a data loader or after minutes of model building."""
import os
from typing import Iterator, List

from mmengine.config import Config, ConfigDict


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


def check_data(cfg: Config, splits=('train_dataloader', 'val_dataloader')
               ) -> None:
    """Raise ``FileNotFoundError`` naming every expected data file that is
    missing for the given dataloaders of ``cfg``."""
    lines = []
    for split in splits:
        loader = cfg.get(split)
        if not isinstance(loader, (dict, ConfigDict)) or 'dataset' not in loader:
            continue
        for path in missing_dataset_files(loader['dataset']):
            lines.append(f'  {split}: {path}')
    if lines:
        raise FileNotFoundError(
            'dataset files not found (paths relative to '
            f'{os.getcwd()}):\n' + '\n'.join(lines) +
            '\nPlace COCO 2017 in MMDetection\'s layout under data/coco/ '
            '(annotations/instances_train2017.json, train2017/, '
            'annotations/instances_val2017.json, val2017/), or point the '
            'config elsewhere with --cfg-options '
            'train_dataloader.dataset.data_root=... '
            'val_dataloader.dataset.data_root=... '
            'test_dataloader.dataset.data_root=...')


def check_pretrained(cfg: Config) -> None:
    """Raise ``FileNotFoundError`` if the backbone's ``Pretrained``
    checkpoint is a local path that does not exist."""
    backbone = cfg.get('model', {}).get('backbone', {}) or {}
    init = backbone.get('init_cfg') or {}
    if not isinstance(init, dict) or init.get('type') != 'Pretrained':
        return
    path = init.get('checkpoint')
    if not path or '://' in str(path):
        return
    if not os.path.isfile(os.path.expanduser(str(path))):
        raise FileNotFoundError(
            f'pretrained backbone checkpoint not found: {path} (looked in '
            f'{os.path.abspath(os.path.expanduser(str(path)))}). Download '
            'the official ImageNet-1K weights there (see README), set the '
            "config's `pretrained` variable, or train from scratch with "
            '--cfg-options model.backbone.init_cfg=None')
