"""What ``tools/train.py`` and ``tools/test.py`` share: reading a config
with its command-line overrides, and building the runner it names."""
import argparse
import os
import os.path as osp
from typing import Optional

from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


def parse_with_launcher(parser: argparse.ArgumentParser
                        ) -> argparse.Namespace:
    """``parser``'s arguments plus MMEngine's ``--launcher`` and
    ``--local_rank`` (which older launchers pass); ``LOCAL_RANK`` is set
    from the latter when the launcher has not set it. A ``config`` that is
    not a file ends the program with a usage message naming it."""
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm', 'mpi'])
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    config = getattr(args, 'config', None)
    if config is not None and not osp.isfile(config):
        parser.error(f'config file not found: {config}')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_config(path: str, launcher: str = 'none',
                cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None) -> Config:
    """The config at ``path`` with ``--cfg-options`` merged, the launcher
    set and a work dir: ``work_dir``, else the config's own, else
    ``./work_dirs/<config name>`` (MMDetection's convention)."""
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(path))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The runner the config names (``runner_type``), else MMEngine's."""
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
