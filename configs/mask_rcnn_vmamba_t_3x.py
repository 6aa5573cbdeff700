# Mask R-CNN + VMamba-T, 3x (36 epochs), ms-crop pipeline: 48.8 box / 43.7
# mask AP as published. Warm-up over 1000 iterations (MMDetection 3.x Swin).
_base_ = [
    './_base_/mask_rcnn_vmamba_t.py',
    './_base_/coco_instance_ms_crop.py',
    './_base_/schedule_adamw_3x.py',
]
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=1000),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True,
         milestones=[27, 33], gamma=0.1),
]
