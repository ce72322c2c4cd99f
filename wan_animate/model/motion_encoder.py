"""LIA-style motion encoder (arXiv 2203.09043): face crops -> one motion vector per frame.

An appearance conv net takes a face crop ``[3, S, S]`` down to a ``style_dim`` feature (1x1 conv,
then residual blocks that halve the resolution until 4 px, then a 4x4 conv); five equalised linears
give ``motion_dim`` magnitudes ``alpha``; the motion vector is ``sum_i alpha_i * q_i`` with ``q_i``
the orthonormalised columns of a learned direction matrix.

Equalised layers keep unit-variance weights and scale them by ``1/sqrt(fan_in)`` at run time;
activations are leaky ReLU (0.2) times sqrt(2) with a per-channel bias. Module names follow the
official checkpoint (``enc.net_app.convs.N``, ``enc.fc.N``, ``dec.direction.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wan_animate.config import WanAnimateConfig


def make_blur_kernel() -> torch.Tensor:
    """The 4x4 FIR kernel stored as ``*.kernel`` buffers: outer product of [1, 3, 3, 1], summing to 1.

    Built in fp32 as the official model does; every entry (k/64, k in {1, 3, 9}) is exact in
    bf16/fp16 too, so a cast never rounds.
    """
    k = torch.tensor((1.0, 3.0, 3.0, 1.0), dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum()


class Blur(nn.Module):
    """Depthwise FIR low-pass filter before a strided conv (anti-aliasing)."""

    def __init__(self, padding: int, stride: int = 1):
        super().__init__()
        self.padding = padding
        self.stride = stride
        self.register_buffer("kernel", make_blur_kernel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        # The kernel is symmetric, so correlation (conv2d) equals the FIR convolution.
        weight = self.kernel.to(x.dtype)[None, None].expand(channels, 1, -1, -1)
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding, groups=channels)


class EqualConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = 1.0 / math.sqrt(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class ScaledLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2) * sqrt(2); the bias has shape (1, C, 1, 1) as in the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype), 0.2) * math.sqrt(2.0)


class DownBlock(nn.Module):
    """3x3 conv; blurred stride-2 3x3 conv; blurred stride-2 1x1 skip; (main + skip) / sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Sequential(EqualConv2d(in_ch, in_ch, 3, padding=1), ScaledLeakyReLU(in_ch))
        # Blur paddings keep the stride-2 output at exactly half the input size.
        self.conv2 = nn.Sequential(Blur(padding=2), EqualConv2d(in_ch, out_ch, 3, stride=2), ScaledLeakyReLU(out_ch))
        # A 1x1 stride-2 conv reads only every other blurred pixel, so the blur itself is
        # evaluated at stride 2 (same values, a quarter of the work).
        self.skip = nn.Sequential(Blur(padding=1, stride=2), EqualConv2d(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) * (1.0 / math.sqrt(2.0))


class AppearanceNet(nn.Module):
    def __init__(self, size: int, channels: dict[str, int], style_dim: int):
        super().__init__()
        log_size = int(math.log2(size))
        ch = channels[str(size)]
        convs: list[nn.Module] = [nn.Sequential(EqualConv2d(3, ch, 1), ScaledLeakyReLU(ch))]
        for res_log in range(log_size, 2, -1):  # size -> 4 px
            out_ch = channels[str(2 ** (res_log - 1))]
            convs.append(DownBlock(ch, out_ch))
            ch = out_ch
        convs.append(EqualConv2d(ch, style_dim, 4))  # 4x4 -> 1x1
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)  # [N, style_dim]


class _Encoder(nn.Module):
    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        style = config.motion_style_dim
        self.net_app = AppearanceNet(config.motion_encoder_size, config.motion_encoder_channel_sizes, style)
        # No activations between these linears (as in the released model).
        self.fc = nn.Sequential(
            *[EqualLinear(style, style) for _ in range(4)], EqualLinear(style, config.motion_dim)
        )


class _Direction(nn.Module):
    def __init__(self, out_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, motion_dim))

    def forward(self) -> torch.Tensor:
        """Orthonormal motion directions [out_dim, motion_dim], fp32 (Q of the thin QR).

        One small QR per forward (not per frame chunk); on CUDA it runs in cuSOLVER on the
        device without reading results back to the host."""
        return torch.linalg.qr(self.weight.float() + 1e-8).Q


class _Decoder(nn.Module):
    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        self.direction = _Direction(config.motion_encoder_dim, config.motion_dim)


class MotionEncoder(nn.Module):
    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        self.size = config.motion_encoder_size
        self.chunk_size = config.motion_encoder_batch_size
        self.enc = _Encoder(config)
        self.dec = _Decoder(config)

    def magnitudes(self, faces: torch.Tensor) -> torch.Tensor:
        """faces [N, 3, S, S] -> alpha [N, motion_dim] (compute dtype)."""
        return self.enc.fc(self.enc.net_app(faces))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """faces [N, 3, S, S] in [-1, 1] -> motion vectors [N, motion_encoder_dim] (compute dtype).

        Frames go through the conv net ``config.motion_encoder_batch_size`` at a time to bound
        activation memory.
        """
        if faces.shape[-2:] != (self.size, self.size):
            raise ValueError(
                f"face frames are {tuple(faces.shape[-2:])} px but the motion encoder takes "
                f"{self.size}x{self.size}; resize the face crops to motion_encoder_size={self.size}."
            )
        dtype = self.enc.net_app.convs[0][0].weight.dtype
        faces = faces.to(dtype)
        alpha = torch.cat([self.magnitudes(chunk) for chunk in faces.split(self.chunk_size)])
        motion = alpha.float() @ self.dec.direction().T  # [N, motion_encoder_dim]
        return motion.to(dtype)
