"""A second model family for the tests of the family seam (``wan_animate.family``): a toy denoiser
driven by the pose stream only (no face crops, no text or image encoder), with its own config,
checkpoint layout, encoders, batch building and forward. Selected with
``model.family=_fake_family:FAMILY``; nothing in ``train/`` knows it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "toy.safetensors"


@dataclass
class ToyConfig:
    dim: int = 16
    num_layers: int = 2
    # what the trainer's FLOP count and the planner's token and embedding shapes read (no text or image encoder)
    patch_size: tuple = (1, 1, 1)
    ffn_dim: int = 16
    text_len: int = 0
    text_dim: int = 0
    num_image_tokens: int = 0
    image_dim: int = 0


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.gelu(self.proj(h))


class ToyDenoiser(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.pose_in = nn.Linear(16, config.dim)  # the adapter: the driving stream's embedding
        self.x_in = nn.Linear(16, config.dim)
        self.blocks = nn.ModuleList(ToyBlock(config.dim) for _ in range(config.num_layers))
        self.out = nn.Linear(config.dim, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor, pose_latents: torch.Tensor) -> torch.Tensor:
        # x [B, 16, T+1, h, w]; pose_latents [B, 16, T, h, w] (no reference slot)
        pose = F.pad(pose_latents, (0, 0, 0, 0, 1, 0)).to(x.dtype)
        h = self.x_in(x.movedim(1, -1)) + self.pose_in(pose.movedim(1, -1))
        h = h + (t.float() / 1000).view(-1, 1, 1, 1, 1).to(h.dtype)
        for block in self.blocks:
            h = block(h)
        return self.out(h).movedim(-1, 1)


class ToyVAE(nn.Module):
    """Pixels [B, 3, F, H, W] -> latents [B, 16, 1 + (F - 1) / 4, H / 8, W / 8] (a fixed projection)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 16)

    @property
    def module(self) -> nn.Module:  # what the trainer freezes
        return self

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        frames = video[:, :, ::4]
        pooled = F.avg_pool3d(frames.float(), (1, 8, 8))
        return self.proj(pooled.movedim(1, -1)).movedim(-1, 1)


class ToyPipeline:
    """Generation is not exercised by the tests; the trainer uses the frozen encoders only."""

    def __init__(self, dit, vae, text_encoder=None, image_encoder=None, *, device=None):
        self.dit, self.vae = dit, vae
        self.text_encoder = self.image_encoder = SimpleNamespace(module=nn.Identity())
        self.device = device

    @staticmethod
    def detect_layout(path) -> str:
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json")
        return "toy"

    @classmethod
    def from_pretrained(cls, path, *, dit=None, device="cpu", **_):
        torch.manual_seed(0)
        return cls(dit if dit is not None else FAMILY.load(path, dtype=torch.float32, device=device), ToyVAE(),
                   device=device)


class ToyFamily:
    name = "toy"
    presets = ("toy",)
    streams = {"pose": None}
    adapter_prefixes = ("pose_in",)
    lora_targets = (r"blocks\.\d+\.proj",)
    self_attention = r"blocks\.\d+\.proj\."  # the toy's stand-in for a self-attention
    conditions = {"pose": ("pose_latents",)}
    pipeline_class = ToyPipeline

    def config(self, preset=None, folder=None):
        f = Path(folder) / "config.json" if folder else None
        if f is not None and f.is_file():
            return ToyConfig(**json.loads(f.read_text())), str(f)
        return ToyConfig(), f"preset {preset!r}"

    def build(self, config):
        return ToyDenoiser(config)

    def owns(self, names):
        return any(n.startswith("pose_in.") for n in names)

    def dit_path(self, model_folder):
        self.pipeline_class.detect_layout(model_folder)
        return Path(model_folder)

    def load(self, path, *, dtype, device, config=None):
        from safetensors.torch import load_file

        model = self.build(config or self.config(folder=path)[0])
        model.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
        return self.set_precision(model.to(device), dtype)

    def set_precision(self, model, dtype):
        return model.to(dtype) if dtype is not None else model

    def save(self, model, path, *, layout, metadata=None, config=None):
        from safetensors.torch import save_file

        state = model if isinstance(model, dict) else model.state_dict()
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(path) / WEIGHTS))
        (Path(path) / "config.json").write_text(json.dumps(asdict(config or model.config)))
        return [Path(path) / WEIGHTS]

    def export_lora(self, lora_file):
        return {}

    def convert(self, src, dst, to, *, dtype=None, max_shard_size="5GB", config=None):
        raise NotImplementedError("the toy family has one layout")

    def inspect(self, path):
        return {"family": self.name, "layout": "toy", "config": self.config(folder=path)[0]}

    def apply_sequence_parallel(self, model, group):
        raise NotImplementedError("the toy family has no sequence parallelism")

    def stream_sizes(self, config):
        return dict(self.streams)

    @torch.no_grad()
    def build_inputs(self, examples, encoders, device, dtype, clip_len):
        keys = {"noise_seeds": [int(e["noise_seed"]) for e in examples], "keys": [e["key"] for e in examples]}
        if examples[0].get("cached"):  # latents as the data recipe gives them (train.data.preprocess_cached)
            refs = [e["ref_latent"] if e["ref_latent"].ndim == 4 else e["ref_latent"].unsqueeze(1) for e in examples]
            latents = torch.cat([torch.stack(refs), torch.stack([e["latents_target"] for e in examples])], dim=2)
            pose = torch.stack([e["pose_latents"] for e in examples])
            return {"latents": latents.to(device, dtype), "pose_latents": pose.to(device, dtype), **keys}
        vae = encoders.vae
        video = torch.stack([e["video"] for e in examples]).to(device)
        ref = torch.stack([e["ref"] for e in examples]).to(device)
        pose = torch.stack([e["pose"] for e in examples]).to(device)
        latents = torch.cat([vae.encode(ref.unsqueeze(2)), vae.encode(video)], dim=2)
        return {"latents": latents.to(dtype), "pose_latents": vae.encode(pose).to(dtype), **keys}

    def predict(self, model, noisy, timesteps, batch):
        return model(noisy, timesteps, batch["pose_latents"])


FAMILY = ToyFamily()


def write_model_folder(folder: Path, config: ToyConfig | None = None, seed: int = 0) -> Path:
    """A toy model folder: ``config.json`` + ``toy.safetensors``."""
    from safetensors.torch import save_file

    config = config or ToyConfig()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_file(FAMILY.build(config).state_dict(), str(folder / WEIGHTS))
    (folder / "config.json").write_text(json.dumps(asdict(config)))
    return folder
