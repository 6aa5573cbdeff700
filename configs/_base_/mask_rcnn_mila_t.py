# Mask R-CNN + FPN with a MILA-T backbone ("Demystify Mamba in Vision: A
# Linear Attention Perspective", Han et al., NeurIPS 2024) and its official
# ImageNet-1K weights (MLLA_T.pth), downloaded once into torch.hub's cache;
# a copy at data/pretrained/MLLA_T.pth is used instead if present.
_base_ = './mask_rcnn_fpn.py'

pretrained = 'https://cloud.tsinghua.edu.cn/f/7a19712877cb4242889c/?dl=1'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MILA',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
