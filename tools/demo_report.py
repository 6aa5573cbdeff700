"""After a demo run: draw predictions on validation images and plot the
training curves.

    python tools/demo_report.py WORK_DIR [--images 4]

Writes WORK_DIR/report/predictions/*.png (boxes, masks and scores drawn by
MMDetection's visualizer) and WORK_DIR/report/curves.png (training loss and
validation mAPs), and prints the last validation metrics.
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys
import warnings

# MMEngine imports pkg_resources, which setuptools deprecates loudly: silence
# exactly that notice, before MMEngine or MMDetection is imported.
warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')


def last_run_dir(work_dir: str) -> str:
    runs = sorted(d for d in glob.glob(osp.join(work_dir, '*', 'vis_data'))
                  if osp.isfile(osp.join(d, 'scalars.json')))
    if not runs:
        sys.exit(f'error: no training logs (*/vis_data/scalars.json) in '
                 f'{work_dir}')
    return runs[-1]


def read_scalars(path: str):
    train, val = [], []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            (val if 'coco/bbox_mAP' in rec else train).append(rec)
    return train, val


def plot_curves(train, val, out: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r['iter'] for r in train if 'loss' in r]
    ax_loss.plot(steps, [r['loss'] for r in train if 'loss' in r],
                 label='total')
    for key in ('loss_cls', 'loss_bbox', 'loss_mask', 'loss_rpn_cls'):
        ax_loss.plot(steps, [r.get(key, float('nan')) for r in train
                             if 'loss' in r], label=key, alpha=0.7)
    ax_loss.set(xlabel='iteration', ylabel='loss', title='training loss')
    ax_loss.legend()
    epochs = [r.get('step', i + 1) for i, r in enumerate(val)]
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                'coco/segm_mAP_50'):
        ax_map.plot(epochs, [r[key] for r in val], marker='o',
                    label=key.split('/')[1])
    ax_map.set(xlabel='epoch', ylabel='mAP', title='validation', ylim=(0, 1))
    ax_map.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def draw_predictions(config: str, checkpoint: str, images, out_dir: str):
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(model=config, weights=checkpoint,
                               device='cpu', show_progress=False)
    inferencer(images, out_dir=out_dir, pred_score_thr=0.5, no_save_pred=True)
    return sorted(glob.glob(osp.join(out_dir, 'vis', '*.png')))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('work_dir')
    parser.add_argument('--images', type=int, default=4)
    args = parser.parse_args()
    run = last_run_dir(args.work_dir)
    train, val = read_scalars(osp.join(run, 'scalars.json'))
    report = osp.join(args.work_dir, 'report')
    os.makedirs(report, exist_ok=True)
    curves = osp.join(report, 'curves.png')
    plot_curves(train, val, curves)

    configs = glob.glob(osp.join(args.work_dir, '*.py'))
    pointer = osp.join(args.work_dir, 'last_checkpoint')
    if not configs or not osp.isfile(pointer):
        sys.exit(f'error: no config or checkpoint in {args.work_dir}')
    with open(pointer) as f:
        checkpoint = f.read().strip()
    from mmengine.config import Config
    cfg = Config.fromfile(configs[0])
    ds = cfg.val_dataloader.dataset
    img_dir = osp.join(ds.data_root, ds.data_prefix.img)
    images = sorted(glob.glob(osp.join(img_dir, '*.png')))[:args.images]
    drawn = draw_predictions(configs[0], checkpoint, images,
                             osp.join(report, 'predictions'))

    print('\nDemo results')
    if val:
        last = val[-1]
        for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
            print(f'  val {key:12s} {last["coco/" + key]:.3f}')
    print(f'  checkpoint:   {checkpoint}')
    print(f'  curves:       {curves}')
    print(f'  predictions:  {len(drawn)} images in '
          f'{osp.join(report, "predictions", "vis")}/')


if __name__ == '__main__':
    main()
