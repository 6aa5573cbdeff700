# Mask R-CNN + VMamba-B, 1x, single-scale: 49.2 box / 44.1 mask AP as
# published.
_base_ = './mask_rcnn_vmamba_t_1x.py'
# Official ImageNet-1K weights, downloaded once into torch.hub's cache; a
# copy at data/pretrained/<file name> is used instead if present.
pretrained = ('https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'
              'vssm_base_0229_ckpt_epoch_237.pth')

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
