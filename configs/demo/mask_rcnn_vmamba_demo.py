# Demo with VMamba: the MILA demo (data, heads, schedule) with a toy-width
# VMamba of the same design as VMamba-T (ssm_ratio 1, d_state 1) instead.
_base_ = './mask_rcnn_mila_demo.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='VMamba',
        arch=dict(dims=32, depths=(1, 1, 2, 1), ssm_ratio=1.0, d_state=1),
        drop_path_rate=0.0,
        init_cfg=None))
