# Mask R-CNN 1x, design-space backbone: + block design "all": Mamba block
# replaces the whole block (Table 1).
_base_ = './_base_.py'

model = dict(backbone=dict(design='block_all'))
