# Mask R-CNN + MILA-S, 3x, ms-crop: 50.5 box / 44.9 mask AP as published.
_base_ = './mask_rcnn_mila_t_3x.py'
pretrained = 'data/pretrained/MLLA_S.pth'  # official ImageNet-1K weights

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
