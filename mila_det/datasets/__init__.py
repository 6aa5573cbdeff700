from .robust import BadSampleError, SkipBadSamples, replacement_index
from .shapes import CLASSES as SHAPES_CLASSES
from .shapes import make_shapes_coco

__all__ = ['BadSampleError', 'SHAPES_CLASSES', 'SkipBadSamples',
           'make_shapes_coco', 'replacement_index']
