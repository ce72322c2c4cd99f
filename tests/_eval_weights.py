"""Tiny LPIPS / I3D weight files in the real formats for the eval metrics' tests (and
bench/eval_cell.py), written independently of the loaders they test."""

import os

import torch

# torchvision ``features`` conv indices -> kernel size, and the LPIPS tap ends (exclusive).
_TORCHVISION_CONVS = {"vgg": {i: 3 for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)},
                      "alex": {0: 11, 3: 5, 6: 3, 8: 3, 10: 3}}
_LPIPS_TAP_ENDS = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}


def save_tiny_lpips_files(dst_dir, net: str = "vgg", width: int = 4, seed: int = 0) -> tuple[str, str]:
    """A tiny random torchvision-format backbone + lpips-format linear-head pair; returns both paths."""
    g = torch.Generator().manual_seed(seed)
    backbone, in_ch = {}, 3
    for conv_idx, (i, k) in enumerate(_TORCHVISION_CONVS[net].items()):
        out_ch = width * (2 ** min(conv_idx // 2, 3))
        backbone[f"features.{i}.weight"] = torch.randn(out_ch, in_ch, k, k, generator=g) * (2 / (in_ch * k * k)) ** 0.5
        backbone[f"features.{i}.bias"] = torch.zeros(out_ch)
        in_ch = out_ch
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # ignored, as in the real file
    os.makedirs(dst_dir, exist_ok=True)
    bpath, lpath = os.path.join(dst_dir, f"{net}_backbone.pth"), os.path.join(dst_dir, f"{net}_lin.pth")
    torch.save(backbone, bpath)
    chans = [backbone[f"features.{max(i for i in _TORCHVISION_CONVS[net] if i < end)}.weight"].shape[0]
             for end in _LPIPS_TAP_ENDS[net]]
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(chans)}, lpath)
    return bpath, lpath


class TinyI3D(torch.nn.Module):
    """A tiny random 3D-conv net with the real FVD detector's call signature."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv3d(3, dim, (3, 7, 7), stride=(1, 4, 4), padding=(1, 3, 3))
        self.conv2 = torch.nn.Conv3d(dim, dim, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x * 2 - 1
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        f = self.fc(h.mean(dim=(2, 3, 4)))
        return f if return_features else torch.softmax(f, dim=-1)


def save_tiny_i3d(path, seed: int = 0) -> str:
    """``TinyI3D`` as a TorchScript file, the format of ``i3d_torchscript.pt``."""
    torch.jit.script(TinyI3D(seed=seed)).save(str(path))
    return str(path)
