"""A small, runnable ablation of the MILA paper's design space on CPU.

    python tools/make_demo_data.py --out data/shapes
    python tools/design_space_ablation.py                      # every row
    python tools/design_space_ablation.py --rows baseline forget_gate \\
        --iters 100 --out work_dirs/ds_ablation

Each row of ``DESIGN_ROWS`` (mila_det/models/backbones/design_space.py) is
trained at toy width (32 wide, depths 1/1/2/1, head width 32) as the
backbone of the demo Mask R-CNN (configs/demo/mask_rcnn_mila_demo.py: the
built-in shapes dataset, 192x192 images, narrow FPN and heads), from
scratch, with one fixed budget for all (``--iters`` iterations of 4 images,
same seed, same schedule), then evaluated on the shapes validation split.
It writes ``ablation.md`` and ``ablation.csv`` (params and FLOPs of the toy
backbone at 192x192, CPU images/s of that backbone, bbox and segm mAP) and
``ablation.png`` (mAP against speed) under ``--out``.

Toy-data mAP does NOT reproduce the paper's ImageNet accuracies: three
shape classes, a few hundred iterations and a 0.5M-parameter backbone
measure whether a design trains and what it costs, not how well it
transfers. Expect the ranking to differ from the paper's.
"""
import argparse
import csv
import os
import os.path as osp
import statistics
import time
import warnings
from typing import Dict, List, Optional, Sequence

warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

from mila_det.models.backbones.design_space import (  # noqa: E402
    DESIGN_ROWS, LinearAttentionTransformer)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_mila_demo.py')
TOY_ARCH = dict(embed_dims=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
TOY_WIDTHS = [32, 64, 128, 256]
IMAGE_SIZE = 192


def toy_backbone(row: str) -> dict:
    """The backbone config of a row at toy width."""
    return dict(type='LinearAttentionTransformer', arch=TOY_ARCH, design=row,
                drop_path_rate=0.0, pretrain_img_size=IMAGE_SIZE,
                init_cfg=None)


def row_config(row: str, data_root: str, work_dir: str, iters: int,
               num_train: Optional[int] = None) -> Config:
    """The demo Mask R-CNN with the row's toy backbone, trained for
    ``iters`` iterations (warm-up over the first tenth, lr x0.1 at 80%)."""
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.work_dir = work_dir
    cfg.model.backbone = toy_backbone(row)
    cfg.model.neck.in_channels = TOY_WIDTHS
    data_root = data_root.rstrip('/') + '/'
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = data_root
    ann = osp.join(data_root, 'annotations/instances_val.json')
    cfg.val_evaluator.ann_file = ann
    cfg.test_evaluator.ann_file = ann
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters,
                         val_interval=iters + 1)
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
             end=max(1, iters // 10)),
        dict(type='MultiStepLR', by_epoch=False, begin=0, end=iters,
             milestones=[max(1, int(iters * 0.8))], gamma=0.1),
    ]
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=max(
        1, min(50, iters // 5)))
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook',
                                        interval=iters + 1, by_epoch=False)
    cfg.default_hooks.pop('iter_checkpoint', None)
    cfg.log_processor = dict(by_epoch=False)
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    if num_train is not None:  # a subset, for quick checks
        cfg.train_dataloader.dataset.indices = num_train
        cfg.val_dataloader.dataset.indices = num_train
        cfg.test_dataloader.dataset.indices = num_train
    return cfg


def backbone_cost(row: str, batch: int, repeats: int) -> Dict[str, float]:
    """Params (M) and GMACs of the toy backbone at 192x192, and its CPU
    images/s (median of ``repeats`` timed passes after one warm-up)."""
    from mila_det.analysis import count_params
    from mila_det.analysis.design_space import design_space_flop_analyzer
    cfg = toy_backbone(row)
    cfg.pop('type')
    model = LinearAttentionTransformer(**cfg).eval()
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        gmacs = design_space_flop_analyzer(model, (x, )).total() / 1e9
    xb = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    times = []
    with torch.inference_mode():
        model(xb)
        for _ in range(repeats):
            start = time.perf_counter()
            model(xb)
            times.append(time.perf_counter() - start)
    return dict(params=count_params(model) / 1e6, gmacs=gmacs,
                ips=batch / statistics.median(times))


def run_row(row: str, data_root: str, out: str, iters: int,
            num_train: Optional[int] = None, speed_batch: int = 4,
            speed_repeats: int = 3) -> dict:
    """Train and evaluate one row; its table entry."""
    from mmengine.runner import Runner
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = row_config(row, data_root, osp.join(out, row), iters, num_train)
    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val()
    seconds = time.perf_counter() - start
    result = dict(row=row, **backbone_cost(row, speed_batch, speed_repeats),
                  bbox_mAP=100 * metrics.get('coco/bbox_mAP', float('nan')),
                  segm_mAP=100 * metrics.get('coco/segm_mAP', float('nan')),
                  train_eval_s=seconds)
    return result


COLUMNS = [('row', 'row', '{}'), ('params', 'params M', '{:.3f}'),
           ('gmacs', 'GMACs@192', '{:.3f}'), ('ips', 'CPU img/s', '{:.1f}'),
           ('bbox_mAP', 'bbox mAP', '{:.1f}'),
           ('segm_mAP', 'segm mAP', '{:.1f}'),
           ('train_eval_s', 'train+eval s', '{:.0f}')]


def write_outputs(results: List[dict], out: str, iters: int) -> List[str]:
    """ablation.md, ablation.csv and ablation.png under ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = [osp.join(out, f'ablation.{ext}') for ext in ('md', 'csv', 'png')]
    with open(paths[1], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[c[0] for c in COLUMNS])
        writer.writeheader()
        for r in results:
            writer.writerow({k: r[k] for k, _, _ in COLUMNS})
    lines = [f'Design-space ablation on the shapes demo data: toy width '
             f'{TOY_ARCH}, {iters} iterations of 4 images each, '
             f'{IMAGE_SIZE}x{IMAGE_SIZE}. Toy-data mAP does not reproduce '
             f'ImageNet accuracy.', '',
             '| ' + ' | '.join(c[1] for c in COLUMNS) + ' |',
             '|' + '---|' * len(COLUMNS)]
    for r in results:
        lines.append('| ' + ' | '.join(fmt.format(r[k])
                                       for k, _, fmt in COLUMNS) + ' |')
    with open(paths[0], 'w') as f:
        f.write('\n'.join(lines) + '\n')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, marker in (('bbox_mAP', 'o'), ('segm_mAP', 's')):
        ax.scatter([r['ips'] for r in results], [r[key] for r in results],
                   marker=marker, label=key.replace('_', ' '))
    for r in results:
        ax.annotate(r['row'], (r['ips'], r['bbox_mAP']), fontsize=7,
                    xytext=(3, 3), textcoords='offset points')
    ax.set_xlabel(f'toy backbone CPU images/s ({IMAGE_SIZE}x{IMAGE_SIZE})')
    ax.set_ylabel('mAP on shapes val (toy data, not ImageNet)')
    ax.set_title(f'Design space at toy width, {iters} iterations')
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', nargs='+', default=list(DESIGN_ROWS),
                        choices=list(DESIGN_ROWS), metavar='ROW',
                        help='rows of DESIGN_ROWS (default: all)')
    parser.add_argument('--iters', type=int, default=150,
                        help='training iterations per row, 4 images each '
                        '(default: 150)')
    parser.add_argument('--data-root', default='data/shapes',
                        help='the shapes dataset (python '
                        'tools/make_demo_data.py --out data/shapes)')
    parser.add_argument('--out', default='work_dirs/design_space_ablation')
    parser.add_argument('--num-train', type=int, default=None,
                        help='use only the first N train/val images '
                        '(quick checks)')
    parser.add_argument('--speed-batch', type=int, default=4)
    parser.add_argument('--speed-repeats', type=int, default=3)
    args = parser.parse_args(argv)
    ann = osp.join(args.data_root, 'annotations', 'instances_train.json')
    if not osp.isfile(ann):
        parser.error(f'{ann} not found; run python tools/make_demo_data.py '
                     f'--out {args.data_root}')
    results = []
    start = time.perf_counter()
    for row in args.rows:
        results.append(run_row(row, args.data_root, args.out, args.iters,
                               args.num_train, args.speed_batch,
                               args.speed_repeats))
        print(f'{row}: {results[-1]}', flush=True)
    paths = write_outputs(results, args.out, args.iters)
    with open(paths[0]) as f:
        print(f.read())
    print(f'{len(results)} rows in {time.perf_counter() - start:.0f} s; '
          f'wrote {", ".join(paths)}')


if __name__ == '__main__':
    main()
