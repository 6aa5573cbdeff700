"""mila_det: MILA and VMamba backbones for MMDetection 3.x.

Importing the package registers its models in MMDetection's registries.
"""
from .version import __version__
from . import engine, models  # noqa: F401  (registers modules)
from . import registry  # noqa: F401  (the mila_det scope)
from .utils.checkpoint import allow_mmengine_checkpoints
from .utils.config_scope import register_config_scope

# MMEngine checkpoints (resume, load_from) load under weights_only=True.
allow_mmengine_checkpoints()
# Configs can inherit ours as _base_ = 'mila_det::mask_rcnn_mila_s_3x.py'.
register_config_scope()

__all__ = ['__version__']
