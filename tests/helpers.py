"""Small configs and data shared by the tests."""
import importlib.util
import os.path as osp
from types import ModuleType

from mmengine.config import Config

from tests.conftest import REPO_ROOT

TINY_MILA = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def tiny_detector_cfg(config: str, data_root: str, work_dir: str,
                      image_size: int = 128, max_epochs: int = 1,
                      backbone: dict = None) -> Config:
    """``config`` shrunk to run in seconds on CPU: a tiny backbone, the
    shapes dataset at ``data_root``, small images and few proposals."""
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', config))
    cfg.work_dir = work_dir
    if backbone is None:
        backbone = dict(type='MILA', arch=TINY_MILA, drop_path_rate=0.1,
                        init_cfg=None)
    cfg.model.backbone = backbone
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    cfg.model.roi_head.bbox_head.num_classes = 3
    cfg.model.roi_head.mask_head.num_classes = 3
    cfg.model.train_cfg.rpn_proposal.nms_pre = 200
    cfg.model.train_cfg.rpn_proposal.max_per_img = 64
    cfg.model.train_cfg.rcnn.sampler.num = 32
    cfg.model.test_cfg.rpn.nms_pre = 200
    cfg.model.test_cfg.rpn.max_per_img = 64
    metainfo = dict(classes=('rectangle', 'ellipse', 'triangle'))
    # the demo's pipelines, at this image size
    demo = Config.fromfile(
        osp.join(REPO_ROOT, 'configs/demo/mask_rcnn_mila_demo.py'))
    pipeline_train, pipeline_test = (
        [dict(t, scale=(image_size, image_size)) if t['type'] == 'Resize'
         else dict(t) for t in demo[name]]
        for name in ('train_pipeline', 'test_pipeline'))
    for split, ann, img, pipeline in (
            ('train', 'annotations/instances_train.json', 'train/',
             pipeline_train),
            ('val', 'annotations/instances_val.json', 'val/', pipeline_test),
            ('test', 'annotations/instances_val.json', 'val/', pipeline_test)):
        loader = cfg[f'{split}_dataloader']
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.batch_size = 2 if split == 'train' else 1
        loader.dataset.update(data_root=data_root, ann_file=ann,
                              data_prefix=dict(img=img), metainfo=metainfo,
                              pipeline=pipeline)
        if split == 'train':
            loader.dataset.filter_cfg = dict(filter_empty_gt=True, min_size=4)
    for split in ('val', 'test'):
        cfg[f'{split}_evaluator'].ann_file = osp.join(
            data_root, 'annotations/instances_val.json')
    cfg.train_cfg.max_epochs = max_epochs
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=5)
    ]
    cfg.default_hooks.logger.interval = 1
    cfg.env_cfg.dist_cfg = dict(backend='gloo')
    cfg.randomness = dict(seed=0, deterministic=True)
    cfg.custom_hooks = [dict(type='EpochSeedHook')]
    return cfg


def narrow_heads(cfg: Config, width: int = 32) -> Config:
    """The FPN and the RPN, box and mask heads ``width`` channels wide (box
    FCs ``2 * width``) instead of 256 (FCs 1024): at full width each
    checkpoint (weights and AdamW state) is 240 MB and the mask head most
    of a step's time. For tests whose checks do not depend on the widths."""
    m = cfg.model
    m.neck.out_channels = width
    m.rpn_head.in_channels = m.rpn_head.feat_channels = width
    m.roi_head.bbox_roi_extractor.out_channels = width
    m.roi_head.bbox_head.in_channels = width
    m.roi_head.bbox_head.fc_out_channels = 2 * width
    m.roi_head.mask_roi_extractor.out_channels = width
    m.roi_head.mask_head.in_channels = width
    m.roi_head.mask_head.conv_out_channels = width
    return cfg


def load_tool(path) -> ModuleType:
    """A script of tools/ (``path`` relative to the repository root, or
    absolute) imported as a module, for tests that call its functions."""
    path = osp.join(REPO_ROOT, path)
    spec = importlib.util.spec_from_file_location(
        osp.splitext(osp.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
