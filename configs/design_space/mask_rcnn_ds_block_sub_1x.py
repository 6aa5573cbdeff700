# Mask R-CNN 1x, design-space backbone: + block design "sub": Mamba block
# replaces the attention sub-block (Table 1).
_base_ = './_base_.py'

model = dict(backbone=dict(design='block_sub'))
