# Mask R-CNN + MILA-B, 1x, ms-crop: 50.5 box / 45.0 mask AP as published.
_base_ = './mask_rcnn_mila_t_1x.py'
# Official ImageNet-1K weights (MLLA_B.pth), downloaded once into torch.hub's
# cache; a copy at data/pretrained/MLLA_B.pth is used instead if present.
pretrained = 'https://cloud.tsinghua.edu.cn/f/91c85c5a1061496d8796/?dl=1'

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
