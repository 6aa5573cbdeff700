# Mask R-CNN + FPN with a VMamba-T backbone ("VMamba: Visual State Space
# Model", Liu et al., 2024) and its official ImageNet-1K weights, downloaded
# once into torch.hub's cache; a copy at data/pretrained/<file name> is used
# instead if present.
_base_ = './mask_rcnn_fpn.py'

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
