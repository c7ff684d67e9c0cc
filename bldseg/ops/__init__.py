"""Native ops of bldseg, each with a typed functional, a module and a pure-PyTorch reference.

- :func:`dcnv3`, :class:`DCNv3`, :func:`dcnv3_reference`: deformable convolution v3.
- :func:`load_extension` / :class:`NativeExtension`: the one JIT loader for native code.
- :func:`build_norm_layer`, :func:`build_act_layer`, :class:`ToChannelsFirst`,
  :class:`ToChannelsLast`: InternImage helper layers (shared with the backbone).
"""

from ._build import BuildError, BuildInfo, NativeExtension, build_root, load_extension
from ._layers import ToChannelsFirst, ToChannelsLast, build_act_layer, build_norm_layer
from .dcnv3 import DCNv3, dcnv3, dcnv3_output_size, load_dcnv3_op
from .dcnv3_reference import dcnv3_reference

__all__ = [
    "BuildError",
    "BuildInfo",
    "DCNv3",
    "NativeExtension",
    "ToChannelsFirst",
    "ToChannelsLast",
    "build_act_layer",
    "build_norm_layer",
    "build_root",
    "dcnv3",
    "dcnv3_output_size",
    "dcnv3_reference",
    "load_dcnv3_op",
    "load_extension",
]
