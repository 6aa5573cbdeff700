# Mask R-CNN with FPN as MMDetection defines it (FPN 256 x 5 levels, RPN,
# RoIAlign 7x7 box / 14x14 mask heads, 80 classes); each config swaps in its
# backbone and the FPN input widths.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mila_det'], allow_failed_imports=False)

# Checkpoints: MMDetection's epoch_<e>.pth after every epoch, plus
# iter_<n>.pth every 1000 iterations (the newest two kept), each a full
# resume point (weights, optimizer, lr schedule, log history) named in
# work_dir/last_checkpoint. A COCO epoch is 7,330 iterations at 16 images
# (about an hour on 8 GPUs), so a kill used to cost up to an epoch; now it
# costs at most 1000 iterations (~1/7 epoch, minutes), while a save (a few
# seconds for 0.5-1.4 GB of weights and AdamW state) stays under 1% of the
# time. `tools/train.py CONFIG --resume` picks the newest checkpoint and
# ResumableEpochBasedTrainLoop (the schedule base) continues a mid-epoch one
# with the epoch's remaining batches, in the same order, none repeated.
default_hooks = dict(
    iter_checkpoint=dict(type='IterCheckpointHook', interval=1000,
                         max_keep_ckpts=2))
