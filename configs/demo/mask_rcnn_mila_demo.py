# Demo: Mask R-CNN + a small MILA on the built-in shapes dataset
# (python tools/make_demo_data.py), trained and evaluated on CPU in minutes.
# It inherits the real MILA-T recipe and changes only what a 2-core CPU run
# needs; each change says why.
_base_ = '../mask_rcnn_mila_t_1x.py'

data_root = 'data/shapes/'
classes = ('rectangle', 'ellipse', 'triangle')
image_size = 192  # the generated images' size
max_epochs = 10  # 600 iterations of 4 images: ~8 minutes on 2 cores

# A MILA of the same design at toy width/depth (~0.6M parameters), trained
# from scratch: there are no pretrained weights for it.
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=32, depths=(1, 1, 2, 1),
                  num_heads=(1, 2, 4, 8)),
        drop_path_rate=0.0,
        # Trained from scratch: the stem's BatchNorms must learn their
        # statistics (norm_eval=True, the default, suits pretrained ones).
        norm_eval=False,
        init_cfg=None),
    # Narrower FPN and heads: the stock 256-wide heads cost most of the CPU
    # time at this image size and have far more capacity than 3 classes need.
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256,
                       num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(in_channels=64, conv_out_channels=64,
                       num_classes=len(classes))),
    # Fewer proposals and RoI samples: at most 4 objects per image.
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    train_dataloader,
    dataset=dict(
        train_dataloader['dataset'],
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# A higher lr with a short warm-up: a few hundred iterations from scratch.
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=60),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[7, 9], gamma=0.1),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
auto_scale_lr = dict(base_batch_size=4)
# An iteration checkpoint every 25 iterations (~20 s here; an epoch is 60)
# besides the per-epoch ones: a kill loses seconds.
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=1, max_keep_ckpts=2),
    iter_checkpoint=dict(interval=25))
# No GPU: gloo for two-process runs (tools/dist_train.sh CONFIG 2).
env_cfg = dict(dist_cfg=dict(backend='gloo'))
# Reproducible on CPU, also across kill-and-resume (--resume), from an epoch
# or an iteration checkpoint: the train loop seeds every iteration from
# (seed, iteration) and the data loads in the main process (num_workers=0).
randomness = dict(seed=0, deterministic=True)
