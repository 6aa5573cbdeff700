# Mask R-CNN + MILA-T, 1x (12 epochs), ms-crop pipeline: 46.8 box / 42.1 mask
# AP on COCO val2017 as published. ImageNet weights: MLLA_T.pth.
_base_ = [
    './_base_/mask_rcnn_fpn.py',
    './_base_/coco_instance_ms_crop.py',
    './_base_/schedule_adamw_1x.py',
]
# Official ImageNet-1K weights (MLLA_T.pth), downloaded once into torch.hub's
# cache; a copy at data/pretrained/MLLA_T.pth is used instead if present.
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
