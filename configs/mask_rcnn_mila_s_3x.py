# Mask R-CNN + MILA-S, 3x, ms-crop: 50.5 box / 44.9 mask AP as published.
_base_ = './mask_rcnn_mila_t_3x.py'
# Official ImageNet-1K weights (MLLA_S.pth), downloaded once into torch.hub's
# cache; a copy at data/pretrained/MLLA_S.pth is used instead if present.
pretrained = 'https://cloud.tsinghua.edu.cn/f/0e5d0b1409d540aaa80c/?dl=1'

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
