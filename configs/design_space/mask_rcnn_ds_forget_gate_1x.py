# Mask R-CNN 1x, design-space backbone: + forget gate, causal raster-order scan
# (Table 1).
_base_ = './_base_.py'

model = dict(backbone=dict(design='forget_gate'))
