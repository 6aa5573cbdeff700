from .shapes import CLASSES as SHAPES_CLASSES
from .shapes import make_shapes_coco

__all__ = ['SHAPES_CLASSES', 'make_shapes_coco']
