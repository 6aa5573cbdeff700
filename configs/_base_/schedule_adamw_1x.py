# 12 epochs, lr x0.1 at epochs 8 and 11, linear warm-up from 0.001x over 500
# iterations (MMDetection's schedule_1x, as the MILA runs used), AdamW
# lr 1e-4 / wd 0.05 with no decay on norms, for 16 images per iteration
# (8 GPUs x 2). --auto-scale-lr rescales lr for another total batch.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

# MMEngine's epoch loop that can also resume inside an epoch (from the
# iteration checkpoints of mask_rcnn_fpn.py): it skips the batches the
# checkpoint had trained without reading them, and seeds every iteration
# from (seed, iteration). See mila_det/engine.py.
train_cfg = dict(type='ResumableEpochBasedTrainLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=0.0001,
        betas=(0.9, 0.999),
        weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))
auto_scale_lr = dict(enable=False, base_batch_size=16)
