# Mask R-CNN + VMamba-S, 3x, ms-crop: 49.9 box / 44.2 mask AP as published.
_base_ = './mask_rcnn_vmamba_t_3x.py'
# Official ImageNet-1K weights, downloaded once into torch.hub's cache; a
# copy at data/pretrained/<file name> is used instead if present.
pretrained = ('https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'
              'vssm_small_0229_ckpt_epoch_222.pth')

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
