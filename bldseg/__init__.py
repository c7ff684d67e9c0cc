"""bldseg: satellite building segmentation as one reproducible system.

Sub-packages:
    data: RLE, readers for the competition and folder layouts, the memory-mapped cache,
        the synthetic world and the torch datasets.
    ops: native operators (DCNv3) with their pure-PyTorch references.
"""

__version__ = "0.1.0"
