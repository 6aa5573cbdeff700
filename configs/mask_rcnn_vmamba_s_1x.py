# Mask R-CNN + VMamba-S, 1x, single-scale: 48.7 box / 43.7 mask AP as
# published.
_base_ = './mask_rcnn_vmamba_t_1x.py'
# Official ImageNet-1K weights, downloaded once into torch.hub's cache; a
# copy at data/pretrained/<file name> is used instead if present.
pretrained = ('https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'
              'vssm_small_0229_ckpt_epoch_222.pth')

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
