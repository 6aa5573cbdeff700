# Mask R-CNN 1x, design-space backbone: "MILA-T-like + forget gate", i.e.
# block "sub" + CPE + LePE + RoPE + forget gate on the Swin-T macro design
# (Swin's patch embedding and merging, 96/192/384/768 wide; not MILA's conv
# stem, conv downsampling or widths). In neither of the paper's tables.
_base_ = './_base_.py'

model = dict(backbone=dict(design='mila_like_forget_gate'))
