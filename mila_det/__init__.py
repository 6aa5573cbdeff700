"""mila_det: MILA and VMamba backbones for MMDetection 3.x.

Importing the package registers its models in MMDetection's registries.
"""
from .version import __version__
from . import engine, models  # noqa: F401  (registers modules)
from .utils.checkpoint import allow_mmengine_checkpoints

# MMEngine checkpoints (resume, load_from) load under weights_only=True.
allow_mmengine_checkpoints()

__all__ = ['__version__']
