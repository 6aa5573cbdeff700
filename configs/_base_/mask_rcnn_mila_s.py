# Mask R-CNN + FPN with a MILA-S backbone and its official ImageNet-1K
# weights (MLLA_S.pth), downloaded once into torch.hub's cache; a copy at
# data/pretrained/MLLA_S.pth is used instead if present.
_base_ = './mask_rcnn_mila_t.py'

pretrained = 'https://cloud.tsinghua.edu.cn/f/0e5d0b1409d540aaa80c/?dl=1'

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
