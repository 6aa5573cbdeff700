# Mask R-CNN + MILA-S, 1x, ms-crop: 49.2 box / 44.2 mask AP as published.
_base_ = './mask_rcnn_mila_t_1x.py'
pretrained = 'data/pretrained/MLLA_S.pth'  # official ImageNet-1K weights

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
