# Mask R-CNN 1x with a backbone of the MILA paper's linear-attention design
# space (LinearAttentionTransformer: Swin-T macro design, 96/192/384/768
# wide). Each config of this folder overrides only model.backbone.design, a
# row of DESIGN_ROWS in mila_det/models/backbones/design_space.py; see
# docs/design_space.md. Recipe as configs/mask_rcnn_mila_t_1x.py (ms-crop
# pipeline, AdamW 1e-4, 12 epochs). No ImageNet weights of these designs
# exist: the backbone starts from random init unless you set init_cfg, e.g.
# model = dict(backbone=dict(init_cfg=dict(type='Pretrained',
#                                          checkpoint='your_imagenet.pth')))
_base_ = [
    '../_base_/mask_rcnn_fpn.py',
    '../_base_/coco_instance_ms_crop.py',
    '../_base_/schedule_adamw_1x.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='LinearAttentionTransformer',
        arch='tiny',
        design='baseline',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=None),
    neck=dict(in_channels=[96, 192, 384, 768]))

# No weight decay on the designs' own parameters either (APE tables are
# 'absolute_pos_embed', covered by the base; Mamba's A_log and D).
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={
        'A_log': dict(decay_mult=0.),
        'attn.D': dict(decay_mult=0.),
    }))
