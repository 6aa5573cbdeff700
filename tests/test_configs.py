"""Every config parses, builds, and resolves to the published recipe."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config

from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mila_det.utils.weights import OFFICIAL_FILES
from tests.conftest import REPO_ROOT

CONFIGS = sorted(glob.glob(osp.join(REPO_ROOT, 'configs', '*.py')))
# the authors' ImageNet-1K file names (MILA's and VMamba's READMEs)
IMAGENET_FILES = {
    'tiny': dict(MILA='MLLA_T.pth',
                 VMamba='vssm1_tiny_0230s_ckpt_epoch_264.pth'),
    'small': dict(MILA='MLLA_S.pth',
                  VMamba='vssm_small_0229_ckpt_epoch_222.pth'),
    'base': dict(MILA='MLLA_B.pth',
                 VMamba='vssm_base_0229_ckpt_epoch_237.pth')}
MS_SHORT_SIDES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]

# name: backbone type, arch, drop path, pipeline, epochs, milestones,
# warm-up iterations, FPN in_channels, published params (M, as the papers
# round them: the MILA paper's and the VMamba paper's Mask R-CNN tables)
RECIPES = {
    'mask_rcnn_mila_t_1x': ('MILA', 'tiny', 0.1, 'ms-crop', 12, [8, 11], 500,
                            [64, 128, 256, 512], 44),
    'mask_rcnn_mila_t_3x': ('MILA', 'tiny', 0.3, 'ms-crop', 36, [27, 33], 500,
                            [64, 128, 256, 512], 44),
    'mask_rcnn_mila_s_1x': ('MILA', 'small', 0.1, 'ms-crop', 12, [8, 11], 500,
                            [64, 128, 256, 512], 63),
    'mask_rcnn_mila_s_3x': ('MILA', 'small', 0.3, 'ms-crop', 36, [27, 33],
                            500, [64, 128, 256, 512], 63),
    'mask_rcnn_mila_b_1x': ('MILA', 'base', 0.1, 'ms-crop', 12, [8, 11], 500,
                            [96, 192, 384, 768], 115),
    'mask_rcnn_vmamba_t_1x': ('VMamba', 'tiny', 0.2, 'single-scale', 12,
                              [8, 11], 1000, [96, 192, 384, 768], 50),
    'mask_rcnn_vmamba_t_3x': ('VMamba', 'tiny', 0.2, 'ms-crop', 36, [27, 33],
                              1000, [96, 192, 384, 768], 50),
    'mask_rcnn_vmamba_s_1x': ('VMamba', 'small', 0.3, 'single-scale', 12,
                              [8, 11], 1000, [96, 192, 384, 768], 70),
    'mask_rcnn_vmamba_s_3x': ('VMamba', 'small', 0.3, 'ms-crop', 36,
                              [27, 33], 1000, [96, 192, 384, 768], 70),
    'mask_rcnn_vmamba_b_1x': ('VMamba', 'base', 0.6, 'single-scale', 12,
                              [8, 11], 1000, [128, 256, 512, 1024], 108),
}


def test_every_config_has_a_recipe():
    names = {osp.splitext(osp.basename(c))[0] for c in CONFIGS}
    assert names == set(RECIPES)


def _pipeline_kind(pipeline) -> str:
    types = [t['type'] for t in pipeline]
    if 'RandomChoice' in types:
        choice = pipeline[types.index('RandomChoice')]['transforms']
        first, second = choice
        assert [t['type'] for t in second] == [
            'RandomChoiceResize', 'RandomCrop', 'RandomChoiceResize']
        assert first[0]['scales'] == [(s, 1333) for s in MS_SHORT_SIDES]
        assert second[0]['scales'] == [(400, 1333), (500, 1333), (600, 1333)]
        assert second[1]['crop_type'] == 'absolute_range'
        assert tuple(second[1]['crop_size']) == (384, 600)
        assert second[1]['allow_negative_crop'] is True
        assert second[2]['scales'] == [(s, 1333) for s in MS_SHORT_SIDES]
        assert types.index('RandomFlip') < types.index('RandomChoice')
        return 'ms-crop'
    resize = pipeline[types.index('Resize')]
    assert tuple(resize['scale']) == (1333, 800) and resize['keep_ratio']
    return 'single-scale'


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_config_resolves_to_published_recipe(name):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', f'{name}.py'))
    (bb_type, arch, drop_path, pipeline, epochs, milestones, warmup, fpn_in,
     _) = RECIPES[name]
    assert cfg.custom_imports == dict(imports=['mila_det'],
                                      allow_failed_imports=False)
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.drop_path_rate) == (bb_type, arch, drop_path)
    assert tuple(bb.out_indices) == (0, 1, 2, 3)
    assert bb.init_cfg.type == 'Pretrained'
    assert bb.init_cfg.checkpoint == cfg.pretrained
    # the official address of this arch's ImageNet-1K file
    assert OFFICIAL_FILES.get(cfg.pretrained) == IMAGENET_FILES[arch][bb_type]
    assert cfg.model.neck.in_channels == fpn_in
    assert cfg.model.neck.out_channels == 256 and cfg.model.neck.num_outs == 5
    opt = cfg.optim_wrapper.optimizer
    assert opt == dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999),
                       weight_decay=0.05)
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    for key in ('norm', 'absolute_pos_embed', 'relative_position_bias_table'):
        assert keys[key] == dict(decay_mult=0.0)
    assert cfg.train_cfg.max_epochs == epochs
    warm, step = cfg.param_scheduler
    assert (warm.type, warm.start_factor, warm.by_epoch, warm.end) == (
        'LinearLR', 0.001, False, warmup)
    assert (step.type, step.milestones, step.gamma, step.end) == (
        'MultiStepLR', milestones, 0.1, epochs)
    assert cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_dataloader.batch_size == 2
    assert _pipeline_kind(cfg.train_dataloader.dataset.pipeline) == pipeline
    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    test_resize = [t for t in cfg.test_dataloader.dataset.pipeline
                   if t['type'] == 'Resize'][0]
    assert tuple(test_resize['scale']) == (1333, 800)
    prep = cfg.model.data_preprocessor
    assert prep.mean == [123.675, 116.28, 103.53]
    assert prep.std == [58.395, 57.12, 57.375] and prep.bgr_to_rgb
    assert cfg.val_evaluator.metric == ['bbox', 'segm']


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_config_builds_with_published_parameter_count(name):
    register_all_modules()
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', f'{name}.py'))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(params) == RECIPES[name][-1], params


@pytest.mark.parametrize('name', ['mask_rcnn_mila_demo',
                                  'mask_rcnn_vmamba_demo'])
def test_demo_configs_build_and_take_a_step(name):
    import torch

    from mila_det.utils.synthetic import synthetic_det_batch
    register_all_modules()
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'demo',
                                   f'{name}.py'))
    assert cfg.train_dataloader.dataset.data_root == 'data/shapes/'
    model = MODELS.build(cfg.model)
    model.init_weights()
    images, samples = synthetic_det_batch(2, 192, 192)
    data = model.data_preprocessor(
        dict(inputs=[(img * 50 + 110).clamp(0, 255) for img in images],
             data_samples=samples), True)
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)


@pytest.mark.parametrize(
    'path,interval',
    [(c, 1000) for c in CONFIGS] + [
        (osp.join(REPO_ROOT, 'configs', 'demo', f'{n}.py'), 25)
        for n in ('mask_rcnn_mila_demo', 'mask_rcnn_vmamba_demo')],
    ids=lambda v: osp.splitext(osp.basename(v))[0] if isinstance(v, str)
    else str(v))
def test_config_checkpoints_inside_epochs_and_resumes_there(path, interval):
    """Epoch checkpoints as MMDetection's, plus iteration ones (the newest
    two kept), with the loop that resumes inside an epoch."""
    cfg = Config.fromfile(path)
    assert cfg.default_hooks.checkpoint.type == 'SafeCheckpointHook'
    assert cfg.default_hooks.checkpoint.interval == 1
    assert cfg.default_hooks.divergence_guard.type == 'DivergenceGuardHook'
    assert cfg.default_hooks.skipped_samples.type == 'SkippedSamplesHook'
    assert cfg.default_hooks.iter_checkpoint == dict(
        type='IterCheckpointHook', interval=interval, max_keep_ckpts=2)
    assert cfg.train_cfg.type == 'ResumableEpochBasedTrainLoop'
