"""LPIPS (Zhang et al. 2018) from user-given weight files.

Two files, in the formats the public ``lpips`` package and torchvision use:

* ``backbone``: a torchvision ``vgg16`` or ``alexnet`` state dict (``features.<i>.weight`` /
  ``.bias``; ``classifier.*`` keys are ignored), e.g. ``vgg16-397923af.pth`` or
  ``alexnet-owt-7be5be79.pth``.
* ``linear``: the LPIPS linear-head file of the same net, e.g. ``lpips/weights/v0.1/vgg.pth``:
  keys ``lin<k>.model.1.weight`` of shape ``[1, C_k, 1, 1]`` for the 5 tapped layers.

The feature net is rebuilt from the shapes in the file, so a smaller network saved with the same
keys (as the tests do) loads the same way. Distance per image: inputs in [-1, 1] are shifted and
scaled per channel, features at the 5 taps are unit-normalised over channels, squared
differences are weighted by the linear heads, averaged over space and summed over taps.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from wan_animate.video_io import frames_to_tensor
from wan_animate.weights.files import WeightsFileError, load_torch_file

# Indices of the torchvision ``features`` Sequential that end each LPIPS tap (exclusive).
# vgg16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. alexnet: relu1 .. relu5.
TAP_ENDS = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}
# Layer kinds of torchvision's ``features`` up to the last tap: conv (C), relu (R), max-pool (M).
LAYOUT = {
    "vgg": "CRCRM" "CRCRM" "CRCRCRM" "CRCRCRM" "CRCRCR",
    "alex": "CRM" "CRM" "CR" "CR" "CR",
}
# AlexNet's convs have their own kernel / stride / padding; VGG uses 3x3, stride 1, pad 1.
ALEX_CONV = {0: (11, 4, 2), 3: (5, 1, 2), 6: (3, 1, 1), 8: (3, 1, 1), 10: (3, 1, 1)}
ALEX_POOL = (3, 2)
# The lpips package's ScalingLayer constants (ImageNet statistics in [-1, 1] units).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPSError(ValueError):
    """An LPIPS weight file is missing or does not match the expected format."""


def _load_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    if not path or not os.path.isfile(path):
        raise LPIPSError(f"LPIPS {what} weights file {str(path)!r} does not exist; pass an existing path")
    try:
        return load_torch_file(path, what=f"LPIPS {what} weights file")
    except WeightsFileError as err:
        raise LPIPSError(str(err)) from None


class LPIPS(nn.Module):
    def __init__(self, net: str, features: nn.Sequential, lins: nn.ModuleList):
        super().__init__()
        self.net = net
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.features = features
        self.lins = lins
        self.tap_ends = TAP_ENDS[net]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(cls, backbone_path, linear_path, net: str = "vgg") -> "LPIPS":
        if net not in TAP_ENDS:
            raise LPIPSError(f"LPIPS net {net!r} is not supported; choose 'vgg' or 'alex'")
        backbone = _load_state_dict(backbone_path, "backbone")
        if any(k.startswith("features.") for k in backbone):  # a whole torchvision model: its feature net
            backbone = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
        layout = LAYOUT[net]
        layers: list[nn.Module] = []
        for i, kind in enumerate(layout):
            if kind == "R":
                layers.append(nn.ReLU(inplace=False))
            elif kind == "M":
                layers.append(nn.MaxPool2d(*ALEX_POOL) if net == "alex" else nn.MaxPool2d(2, 2))
            else:
                if f"{i}.weight" not in backbone:
                    raise LPIPSError(
                        f"{backbone_path}: missing 'features.{i}.weight'; expected a torchvision "
                        f"{'vgg16' if net == 'vgg' else 'alexnet'} state dict (net={net!r})"
                    )
                w = backbone[f"{i}.weight"]
                k, stride, pad = ALEX_CONV[i] if net == "alex" else (3, 1, 1)
                if w.ndim != 4 or w.shape[-1] != k:
                    raise LPIPSError(f"{backbone_path}: features.{i}.weight has shape {tuple(w.shape)}, "
                                     f"expected [out, in, {k}, {k}] for net={net!r}")
                conv = nn.Conv2d(w.shape[1], w.shape[0], k, stride=stride, padding=pad)
                conv.weight.data.copy_(w)
                conv.bias.data.copy_(backbone[f"{i}.bias"])
                layers.append(conv)
        features = nn.Sequential(*layers)

        linear = _load_state_dict(linear_path, "linear")
        channels = [_tap_channels(features, end) for end in TAP_ENDS[net]]
        lins = nn.ModuleList()
        for k, ch in enumerate(channels):
            key = f"lin{k}.model.1.weight"
            if key not in linear:
                raise LPIPSError(
                    f"{linear_path}: missing {key!r}; expected the lpips package's linear-head file "
                    f"(keys lin0..lin4.model.1.weight), found {sorted(linear)[:6]}"
                )
            w = linear[key]
            if tuple(w.shape) != (1, ch, 1, 1):
                raise LPIPSError(f"{linear_path}: {key} has shape {tuple(w.shape)} but the backbone's tap "
                                 f"{k} has {ch} channels; the two files belong to different nets")
            lin = nn.Conv2d(ch, 1, 1, bias=False)
            lin.weight.data.copy_(w)
            lins.append(lin)
        return cls(net, features, lins).eval().requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a``, ``b``: ``[N, 3, H, W]`` in [-1, 1] -> distances ``[N]``."""
        fa, fb = self._taps((a - self.shift) / self.scale), self._taps((b - self.shift) / self.scale)
        total = 0.0
        for lin, x, y in zip(self.lins, fa, fb):
            diff = (F.normalize(x, dim=1, eps=1e-10) - F.normalize(y, dim=1, eps=1e-10)) ** 2  # unit over channels
            total = total + lin(diff).mean(dim=(2, 3))  # [N, 1]
        return total[:, 0]

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, start = [], 0
        for end in self.tap_ends:
            for layer in self.features[start:end]:
                x = layer(x)
            taps.append(x)
            start = end
        return taps

    @torch.no_grad()
    def video_distance(self, generated, target, *, batch_size: int = 8) -> float:
        """Mean LPIPS over frames of two uint8 videos ``[T, H, W, 3]``."""
        g, t = np.asarray(generated), np.asarray(target)
        if g.shape != t.shape:
            raise ValueError(f"lpips: video shapes differ {g.shape} vs {t.shape}")
        dev = self.shift.device
        out = []
        for i in range(0, len(g), batch_size):
            a, b = (frames_to_tensor(v[i : i + batch_size]).transpose(0, 1).to(dev) for v in (g, t))  # [N, 3, H, W]
            out.append(self(a, b).cpu())
        return float(torch.cat(out).mean())


def _tap_channels(features: nn.Sequential, end: int) -> int:
    convs = [m for m in list(features)[:end] if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels

