# Mask R-CNN + MILA-B, 1x, ms-crop: 50.5 box / 45.0 mask AP as published.
_base_ = './mask_rcnn_mila_t_1x.py'
pretrained = 'data/pretrained/MLLA_B.pth'  # official ImageNet-1K weights

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
