"""Train a detector from a config, MMDetection-style.

    python tools/train.py configs/mask_rcnn_mila_s_3x.py [--work-dir DIR]
        [--resume [CKPT]] [--amp] [--auto-scale-lr] [--cfg-options k=v ...]
        [--launcher none|pytorch|slurm|mpi]
"""
import argparse
import sys
import warnings

# MMEngine imports pkg_resources, which setuptools deprecates loudly: silence
# exactly that notice, before MMEngine or MMDetection is imported.
warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

import mila_det  # noqa: F401,E402  (registers models, safe loading)
from mila_det.hooks import TrainingStopped  # noqa: E402
from mila_det.utils.dist import init_cpu_distributed  # noqa: E402
from mila_det.utils.entry import (  # noqa: E402
    build_runner, load_config, parse_with_launcher)
from mila_det.utils.malloc import keep_freed_memory  # noqa: E402
from mila_det.utils.preflight import check_inputs  # noqa: E402
from mila_det.utils.resume import (  # noqa: E402
    ResumeError, find_resume_checkpoint, unreadable_reason)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (fp16 with loss '
                        'scaling on CUDA, bf16 autocast on CPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by total batch / base batch')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT, or when no path is given from the newest '
        'readable checkpoint in the work dir (epoch_*.pth or iter_*.pth, '
        'the one its last_checkpoint names unless that one is damaged); an '
        'iter_*.pth continues mid-epoch')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. '
                        'train_dataloader.batch_size=4')
    return parse_with_launcher(parser)


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.launcher, args.cfg_options,
                      args.work_dir)
    if args.launcher != 'none' and not torch.cuda.is_available():
        # CPU-only distributed run: gloo, and DDP without device ids.
        cfg.env_cfg.setdefault('dist_cfg', {})['backend'] = 'gloo'
        if cfg.get('model_wrapper_cfg') is None:
            cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel',
                                         device_ids=None)
    if args.amp:
        if torch.cuda.is_available():
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:  # MMEngine's AMP wrapper needs a GPU; bf16 autocast on CPU
            cfg.optim_wrapper.type = 'CPUAutocastOptimWrapper'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr.'
                             'base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def warn(message: str) -> None:
    print(f'warning: {message}', file=sys.stderr, flush=True)


def pick_resume_checkpoint(cfg: Config, resume: str) -> None:
    """Set ``cfg.load_from`` to a checkpoint that can be read.

    ``--resume`` (``resume == 'auto'``) takes the newest readable
    checkpoint of the work dir, warning about each newer unreadable one
    (a half-written file named in ``last_checkpoint``); with none there it
    trains from the start, saying so. ``--resume PATH`` must be readable.

    Raises:
        ResumeError: The named checkpoint, or every checkpoint of the work
            dir, cannot be read.
    """
    if resume == 'auto':
        path, _ = find_resume_checkpoint(cfg.work_dir, warn)
        if path is None:
            warn(f'--resume: no checkpoint in {cfg.work_dir}; training '
                 'starts from the beginning')
            cfg.resume = False
        else:
            cfg.load_from = path
        return
    reason = unreadable_reason(resume)
    if reason is not None:
        raise ResumeError(f'cannot resume from {resume}: {reason}')


def main() -> None:
    args = parse_args()
    keep_freed_memory()  # MILA_DET_MALLOC=default to opt out
    cfg = build_config(args)
    try:  # first: with no checkpoint yet, --resume trains from the start
        if args.resume is not None:
            pick_resume_checkpoint(cfg, args.resume)
    except ResumeError as err:
        sys.exit(f'error: {err}')
    try:
        check_inputs(cfg, pretrained=not cfg.get('resume'))
    except FileNotFoundError as err:
        sys.exit(f'error: {err}')
    init_cpu_distributed(args.launcher)
    runner = build_runner(cfg)
    try:
        runner.train()
    except TrainingStopped as err:  # logged; the message says what to do
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
