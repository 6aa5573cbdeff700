# Mask R-CNN + VMamba-T, 1x (12 epochs), single-scale 1333x800 training:
# 47.3 box / 42.7 mask AP on COCO val2017 as published.
# The VMamba runs used MMDetection 3.x's Swin recipe: warm-up over 1000
# iterations instead of 500.
_base_ = [
    './_base_/mask_rcnn_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './_base_/schedule_adamw_1x.py',
]
# Official ImageNet-1K weights, downloaded once into torch.hub's cache; a
# copy at data/pretrained/<file name> is used instead if present.
pretrained = ('https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'
              'vssm1_tiny_0230s_ckpt_epoch_264.pth')

model = dict(
    backbone=dict(
        _delete_=True,
        type='VMamba',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True,
         milestones=[8, 11], gamma=0.1),
]
