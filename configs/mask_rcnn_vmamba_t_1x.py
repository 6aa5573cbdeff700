# Mask R-CNN + VMamba-T, 1x (12 epochs), single-scale 1333x800 training:
# 47.3 box / 42.7 mask AP on COCO val2017 as published.
# The VMamba runs used MMDetection 3.x's Swin recipe: warm-up over 1000
# iterations instead of 500.
_base_ = [
    './_base_/mask_rcnn_vmamba_t.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './_base_/schedule_adamw_1x.py',
]
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True,
         milestones=[8, 11], gamma=0.1),
]
