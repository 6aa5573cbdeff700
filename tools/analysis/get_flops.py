"""Parameters and FLOPs of the model a config builds.

    python tools/analysis/get_flops.py configs/mask_rcnn_mila_t_1x.py
    python tools/analysis/get_flops.py CONFIG --shape 1280 800 --backbone-only
    python tools/analysis/get_flops.py CONFIG --ssm-convention vim

FLOPs follow the papers' convention: one multiply-add counts once (fvcore /
MMEngine's analyzer), at one 1280x800 input by default, with the detector run
as MMDetection's get_flops runs it (RPN proposals through the RoI heads).
The selective scan is counted analytically (see docs/flops.md).
"""
import argparse
import warnings
from functools import partial

# MMEngine imports pkg_resources, which setuptools deprecates loudly: silence
# exactly that notice, before MMEngine or MMDetection is imported.
warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

from mila_det.analysis import count_params, flop_analyzer  # noqa: E402


def build(config: str):
    import mila_det  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model).eval()


def analyze(model, shape, backbone_only: bool, convention: str):
    h, w = shape
    if backbone_only:
        target, inputs = model.backbone, (torch.randn(1, 3, h, w), )
    else:
        from mila_det.utils.synthetic import synthetic_det_batch
        images, samples = synthetic_det_batch(1, h, w)
        data = model.data_preprocessor(
            dict(inputs=[(images[0] * 50 + 110).clamp(0, 255)],
                 data_samples=samples), False)
        model.forward = partial(model.forward,
                                data_samples=data['data_samples'])
        target, inputs = model, (data['inputs'], )
    with torch.no_grad():
        analyzer = flop_analyzer(target, inputs, convention)
        return analyzer.total(), analyzer.by_module(), \
            analyzer.by_module_and_operator(), count_params(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--shape', nargs=2, type=int, default=[1280, 800],
                        metavar=('H', 'W'))
    parser.add_argument('--backbone-only', action='store_true')
    parser.add_argument('--ssm-convention', choices=['gu', 'vim'],
                        default='gu')
    args = parser.parse_args()
    model = build(args.config)
    total, by_module, by_op, params = analyze(
        model, args.shape, args.backbone_only, args.ssm_convention)
    prefix = '' if args.backbone_only else 'backbone.'
    print(f'{args.config} ({"backbone" if args.backbone_only else "model"}, '
          f'input 3x{args.shape[0]}x{args.shape[1]}, SSM convention '
          f'{args.ssm_convention})')
    print(f'  params: {params / 1e6:.2f} M')
    print(f'  FLOPs:  {total / 1e9:.2f} G (multiply-adds)')
    print('  breakdown (G):')
    backbone = model.backbone
    rows = [f'{prefix}patch_embed'] + [
        f'{prefix}layers.{i}' for i in range(len(backbone.layers))]
    if not args.backbone_only:
        rows += ['backbone', 'neck', 'rpn_head', 'roi_head']
    for name in rows:
        if name in by_module:
            ops = by_op.get(name, {})
            detail = ', '.join(f'{op} {n / 1e9:.2f}' for op, n in sorted(
                ops.items(), key=lambda kv: -kv[1]) if n)
            print(f'    {name:22s} {by_module[name] / 1e9:8.2f}   ({detail})')


if __name__ == '__main__':
    main()
