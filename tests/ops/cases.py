"""The parameter set of one DCNv3 test case, shared by the CPU and CUDA op tests."""

from dataclasses import dataclass

from bldseg.ops import dcnv3_output_size


@dataclass(frozen=True)
class Case:
    n: int  # batch
    h: int  # input height
    w: int  # input width
    group: int  # G
    gc: int  # group_channels C
    kernel: tuple[int, int] = (3, 3)  # (kernel_h, kernel_w)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0
    offset_std: float = 1.5  # spread of the random offsets, in pixels

    def params(self) -> tuple:
        """The 11 op parameters after the tensors, in schema order."""
        return (
            *self.kernel,
            *self.stride,
            *self.pad,
            *self.dilation,
            self.group,
            self.gc,
            self.offset_scale,
        )

    def out_size(self) -> tuple[int, int]:
        return (
            dcnv3_output_size(
                self.h, self.kernel[0], self.stride[0], self.pad[0], self.dilation[0]
            ),
            dcnv3_output_size(
                self.w, self.kernel[1], self.stride[1], self.pad[1], self.dilation[1]
            ),
        )
