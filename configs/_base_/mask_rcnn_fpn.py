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
#
# A multi-day run survives what it meets (mila_det/hooks.py):
# - checkpoints and last_checkpoint are written atomically (temporary file,
#   fsync, rename) and old ones removed only once the new one is complete;
#   a full disk stops the run naming the folder, free space, size needed
#   and the newest good checkpoint;
# - a step with a NaN/inf loss or gradient norm is skipped, 5 in a row stop
#   the run naming the iteration, the loss terms and the checkpoint to go
#   back to; non-finite weights are never saved;
# - an unreadable training image (or one whose size disagrees with its
#   annotation) is replaced by another sample, warned about once and listed
#   at the end of the epoch; more than 0.1% of the dataset stops the run.
default_hooks = dict(
    checkpoint=dict(type='SafeCheckpointHook'),
    iter_checkpoint=dict(type='IterCheckpointHook', interval=1000,
                         max_keep_ckpts=2),
    divergence_guard=dict(type='DivergenceGuardHook', max_consecutive=5),
    skipped_samples=dict(type='SkippedSamplesHook', max_fraction=0.001))
