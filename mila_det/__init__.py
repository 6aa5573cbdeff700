"""mila_det: MILA and VMamba backbones for MMDetection 3.x.

Importing the package registers its models in MMDetection's registries.
"""
from .version import __version__
from . import models  # noqa: F401  (registers the backbones)

__all__ = ['__version__']
