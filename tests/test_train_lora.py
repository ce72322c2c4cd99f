"""LoRA: our community-layout export moves diffusers' WanAnimateTransformer3DModel exactly as it moves
our DiT; apply_lora (merge) equals the live peft model; trainable sets per mode."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanAnimatePipeline, WanAnimateTransformer3DModel

from wan_animate.weights.keymap import diffusers_to_official
from wan_animate.config import WanAnimateConfig
from wan_animate.lora import (
    LoraError, add_lora, apply_lora, default_lora_targets, read_lora, save_lora,
)
from wan_animate.model import WanAnimateDiT


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if "motion_encoder" in name and p.ndim >= 2:
                p.copy_(n)
            elif "norm" in name:
                p.copy_(1 + 0.2 * n)
            elif p.ndim >= 2 and "scale_shift_table" not in name and "padding_tokens" not in name:
                p.copy_(n / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * n)


def _inputs(cfg: WanAnimateConfig, seed: int = 1, frames: int = 2, h: int = 4, w: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = cfg.motion_encoder_size
    return dict(
        x=torch.randn(1, cfg.out_dim, frames + 1, h, w, generator=g),
        t=torch.tensor([611.0]),
        context=torch.randn(1, 512, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, 257, cfg.image_dim, generator=g),
        y=torch.randn(1, cfg.in_dim - cfg.out_dim, frames + 1, h, w, generator=g),
        pose_latents=torch.randn(1, cfg.out_dim, frames, h, w, generator=g),
        face_pixel_values=torch.rand(1, 3, 4 * frames - 3, s, s, generator=g) * 2 - 1,
    )


@torch.no_grad()
def _ours(model, i):
    return model(i["x"], i["t"], i["context"], i["clip_fea"], i["y"], i["pose_latents"], i["face_pixel_values"])


@torch.no_grad()
def _peer(peer, i):
    return peer(hidden_states=torch.cat([i["x"], i["y"]], 1), timestep=i["t"], encoder_hidden_states=i["context"],
                encoder_hidden_states_image=i["clip_fea"], pose_hidden_states=i["pose_latents"],
                face_pixel_values=i["face_pixel_values"], return_dict=False)[0].float()


@pytest.fixture(scope="module")
def pair():
    cfg = WanAnimateConfig.preset("tiny")
    kw = cfg.to_diffusers_config()
    kw.pop("_class_name")
    peer = WanAnimateTransformer3DModel(**kw).eval()
    _randomize(peer, 3)
    ours = WanAnimateDiT(cfg).eval()
    ours.load_state_dict(diffusers_to_official(peer.state_dict(), cfg), strict=True)
    return cfg, peer, ours


def _lora_file(ours_base, cfg, tmp_path, rank=4, alpha=8.0):
    model = WanAnimateDiT(cfg).eval()
    model.load_state_dict(ours_base.state_dict())
    names = add_lora(model, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:  # peft starts B at zero; give the LoRA a real effect
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = save_lora(model, tmp_path / "lora.safetensors")
    return model, names, path


def test_default_targets_are_block_linears_without_face_or_modulation(pair):
    cfg, _, ours = pair
    targets = default_lora_targets(ours)
    assert targets and all(t.startswith("blocks.") for t in targets)
    assert not any("face" in t or "modulation" in t for t in targets)
    per_block = {t.split(".", 2)[2] for t in targets}
    assert per_block == {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                         "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"}
    assert len(targets) == 12 * cfg.num_layers


def test_export_layout_and_diffusers_moves_exactly_like_ours(pair, tmp_path):
    cfg, peer, ours = pair
    live, names, path = _lora_file(ours, cfg, tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    name = names[0]
    assert {f"diffusion_model.{name}.lora_A.weight", f"diffusion_model.{name}.lora_B.weight",
            f"diffusion_model.{name}.alpha"} <= keys
    assert len(keys) == 3 * len(names)

    inputs = _inputs(cfg)
    base_ours, base_peer = _ours(ours, inputs), _peer(peer, inputs)
    assert torch.allclose(base_ours, base_peer, atol=1e-5, rtol=1e-4)  # same weights to start with

    delta_ours = _ours(live, inputs) - base_ours  # peft live model
    merged = WanAnimateDiT(cfg).eval()
    merged.load_state_dict(ours.state_dict())
    assert apply_lora(merged, path, scale=1.0)
    delta_merged = _ours(merged, inputs) - base_ours

    peer_lora = WanAnimateTransformer3DModel.from_config(peer.config).eval()
    peer_lora.load_state_dict(peer.state_dict())
    sd = WanAnimatePipeline.lora_state_dict(str(path))  # diffusers' own converter of this layout
    peer_lora.load_lora_adapter(sd, prefix="transformer", adapter_name="test")
    delta_peer = _peer(peer_lora, inputs) - base_peer

    scale = delta_ours.abs().max()
    assert scale > 1e-2  # the LoRA really moves the output
    assert (delta_peer - delta_ours).abs().max() <= 1e-4 * scale + 1e-5
    assert (delta_merged - delta_ours).abs().max() <= 1e-4 * scale + 1e-5


def test_negative_control_wrong_alpha_changes_the_delta(pair, tmp_path):
    cfg, _, ours = pair
    live, names, path = _lora_file(ours, cfg, tmp_path, alpha=8.0)
    sd = {k: v for k, v in read_lora(path).items()}
    doubled = {}
    for n, (a, b, alpha) in sd.items():
        doubled[f"diffusion_model.{n}.lora_A.weight"] = a
        doubled[f"diffusion_model.{n}.lora_B.weight"] = b
        doubled[f"diffusion_model.{n}.alpha"] = torch.tensor(2 * alpha)
    inputs = _inputs(cfg)
    base = _ours(ours, inputs)
    m1 = WanAnimateDiT(cfg).eval()
    m1.load_state_dict(ours.state_dict())
    apply_lora(m1, doubled)
    delta_live = _ours(live, inputs) - base
    delta_wrong = _ours(m1, inputs) - base
    assert (delta_wrong - delta_live).abs().max() > 0.1 * delta_live.abs().max()


def test_apply_lora_rejects_unknown_modules_and_shapes(pair, tmp_path):
    cfg, _, ours = pair
    bad = {"diffusion_model.blocks.99.self_attn.q.lora_A.weight": torch.zeros(2, cfg.dim),
           "diffusion_model.blocks.99.self_attn.q.lora_B.weight": torch.zeros(cfg.dim, 2)}
    with pytest.raises(LoraError, match="blocks.99"):
        apply_lora(WanAnimateDiT(cfg), bad)
    wrong = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, cfg.dim + 1),
             "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(cfg.dim, 2)}
    with pytest.raises(LoraError, match="shape"):
        apply_lora(WanAnimateDiT(cfg), wrong)


def test_trainer_lora_export_reproduces_the_trained_model(tmp_path):
    """`train.mode=lora` end to end: the base + export/adapters.safetensors + export/lora.safetensors,
    merged with apply_lora, or loaded by diffusers, equals the trained peft model of the checkpoint
    (which, like the export, holds only the trained tensors: tests/test_train_state.py)."""
    from safetensors.torch import load_file

    from wan_animate.weights.load import load_dit
    from wan_animate.weights.save import save_dit

    from accelerate.state import AcceleratorState, GradientState

    from train.config import compose
    from train.loop import run

    out = tmp_path / "run"
    try:  # the run of `train/main.py train.mode=lora ...`, in this process
        result = run(compose([f"train.output_dir={out}", "train.mode=lora", "lora.rank=4", "lora.alpha=8",
                              "optim.lr=5e-3", "train.max_steps=3", "train.checkpoint_every=0",
                              "train.progress=false", "train.validation=false"]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert result["status"] == "finished", result
    model_dir = out / "cache" / "model-tiny-seed0"
    cfg = WanAnimateConfig.preset("tiny")

    live = load_dit(model_dir / "transformer", dtype=torch.float32).eval()
    add_lora(live, rank=4, alpha=8.0)
    loaded = live.load_state_dict(load_file(str(out / "checkpoints" / "step-3" / "model.safetensors")), strict=False)
    assert not loaded.unexpected_keys and not any(".lora_" in k for k in loaded.missing_keys)

    adapters = load_file(str(out / "export" / "adapters.safetensors"))  # official names
    base_and_adapters = load_dit(model_dir / "transformer", dtype=torch.float32).eval()
    assert not base_and_adapters.load_state_dict(adapters, strict=False).unexpected_keys
    save_dit(base_and_adapters, tmp_path / "diffusers", layout="diffusers")
    merged = load_dit(model_dir / "transformer", dtype=torch.float32).eval()
    merged.load_state_dict(adapters, strict=False)
    apply_lora(merged, out / "export" / "lora.safetensors")

    peer = WanAnimateTransformer3DModel.from_pretrained(str(tmp_path / "diffusers")).eval()
    peer.load_lora_adapter(WanAnimatePipeline.lora_state_dict(str(out / "export" / "lora.safetensors")),
                           prefix="transformer", adapter_name="trained")

    base = load_dit(model_dir / "transformer", dtype=torch.float32).eval()
    i = _inputs(cfg)
    want = _ours(live, i)
    moved = (want - _ours(base, i)).abs().max()
    assert moved > 1e-3  # training changed the model
    for got in (_ours(merged, i), _peer(peer, i)):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-5


def test_regex_targets_and_continue_from_a_file(pair, tmp_path):
    from wan_animate.lora import load_lora_into_peft, resolve_lora_targets

    cfg, _, ours = pair
    picked = resolve_lora_targets(ours, [r"blocks\.\d+\.ffn\.(0|2)", "blocks.0.self_attn.q"])
    assert len(picked) == 2 * cfg.num_layers + 1 and "blocks.0.self_attn.q" in picked
    with pytest.raises(LoraError, match="matches no linear"):
        resolve_lora_targets(ours, [r"blocks\.\d+\.nothing"])

    live, names, path = _lora_file(ours, cfg, tmp_path)
    again = WanAnimateDiT(cfg).eval()
    again.load_state_dict(ours.state_dict())
    add_lora(again, rank=4, alpha=8.0)
    assert sorted(load_lora_into_peft(again, path)) == sorted(names)
    i = _inputs(cfg)
    assert torch.equal(_ours(again, i), _ours(live, i))
    wrong_alpha = WanAnimateDiT(cfg).eval()
    add_lora(wrong_alpha, rank=4, alpha=4.0)
    with pytest.raises(LoraError, match="alpha"):
        load_lora_into_peft(wrong_alpha, path)
