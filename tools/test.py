"""Evaluate a checkpoint on a config's test set, MMDetection-style.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
        [--show-dir DIR] [--tta] [--cfg-options k=v ...] [--launcher ...]

CHECKPOINT is a file or an address (``https://...``; downloaded once into
torch.hub's cache, a copy in data/pretrained/ wins). Checkpoints of
MMDetection 3.x and the authors' MMDetection 2.x COCO releases (same key
names for Mask R-CNN) both load, weights only.
"""
import argparse
import sys
import warnings

# MMEngine imports pkg_resources, which setuptools deprecates loudly: silence
# exactly that notice, before MMEngine or MMDetection is imported.
warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

from mmengine.config import DictAction  # noqa: E402

import mila_det  # noqa: F401,E402  (registers models, safe loading)
from mila_det.utils.dist import init_cpu_distributed  # noqa: E402
from mila_det.utils.entry import (  # noqa: E402
    build_runner, load_config, parse_with_launcher)
from mila_det.utils.malloc import keep_freed_memory  # noqa: E402
from mila_det.utils.preflight import check_inputs  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a '
                                     'detector')
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint file or address')
    parser.add_argument('--work-dir', help='where evaluation logs go')
    parser.add_argument('--out', help='dump predictions to a .pkl file')
    parser.add_argument('--show', action='store_true',
                        help='show predictions in a window')
    parser.add_argument('--show-dir', help='save images with predictions '
                        'drawn, under WORK_DIR/TIMESTAMP/SHOW_DIR')
    parser.add_argument('--wait-time', type=float, default=2)
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation from the config')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parse_with_launcher(parser)


def main() -> None:
    args = parse_args()
    keep_freed_memory()  # MILA_DET_MALLOC=default to opt out
    cfg = load_config(args.config, args.launcher, args.cfg_options,
                      args.work_dir)
    cfg.load_from = args.checkpoint
    # Testing loads the whole detector; the backbone's ImageNet init is moot.
    if cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None
    try:  # an address is downloaded (once, into torch.hub's cache) here
        check_inputs(cfg, splits=('test_dataloader', ), pretrained=False,
                     checkpoint=args.checkpoint)
    except FileNotFoundError as err:
        sys.exit(f'error: {err}')

    if args.show or args.show_dir:
        hooks = cfg.default_hooks
        if 'visualization' not in hooks:
            raise ValueError('--show/--show-dir need a visualization hook in '
                             'default_hooks')
        hooks.visualization.draw = True
        hooks.visualization.show = args.show
        hooks.visualization.wait_time = args.wait_time
        if args.show_dir:
            hooks.visualization.test_out_dir = args.show_dir
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ValueError('--tta needs tta_model and tta_pipeline in the '
                             'config')
        cfg.model = dict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline

    init_cpu_distributed(args.launcher)
    runner = build_runner(cfg)
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must end in .pkl or .pickle')
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()
