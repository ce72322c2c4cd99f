"""Parity of WanAnimateDiT with diffusers' WanAnimateTransformer3DModel on the same random weights.

The weights are created in the diffusers model (every parameter random and non-zero, including the
face padding tokens) and reach ours only through ``wan_animate.checkpoint``: the in-memory key map
``diffusers_to_official`` for one config, ``save_pretrained`` + ``load_dit`` for the other.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanAnimateTransformer3DModel

from wan_animate.weights.keymap import diffusers_to_official, official_to_diffusers
from wan_animate.weights.load import load_dit
from wan_animate.config import WanAnimateConfig
from wan_animate.model import WanAnimateDiT, set_precision

FP32_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-zero, at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "motion_encoder" in name and p.ndim >= 2:  # equalised layers scale at run time
                p.copy_(noise)
            elif "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim >= 2 and "scale_shift_table" not in name and "padding_tokens" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:  # biases, modulation tables, padding tokens
                p.copy_(0.2 * noise)
        assert all((p != 0).all() for p in model.parameters())


def make_peer(cfg: WanAnimateConfig, seed: int) -> WanAnimateTransformer3DModel:
    kwargs = cfg.to_diffusers_config()
    kwargs.pop("_class_name")
    peer = WanAnimateTransformer3DModel(**kwargs).eval()
    randomize_(peer, seed)
    return peer


def make_inputs(cfg: WanAnimateConfig, seed: int, batch: int = 2, latent_frames: int = 2, h: int = 4, w: int = 6):
    g = torch.Generator().manual_seed(seed)
    s = cfg.motion_encoder_size
    return dict(
        x=torch.randn(batch, cfg.out_dim, latent_frames + 1, h, w, generator=g),
        t=torch.tensor([937.0, 212.5])[:batch],
        context=torch.randn(batch, 512, cfg.text_dim, generator=g),
        clip_fea=torch.randn(batch, 257, cfg.image_dim, generator=g),
        y=torch.randn(batch, cfg.in_dim - cfg.out_dim, latent_frames + 1, h, w, generator=g),
        pose_latents=torch.randn(batch, cfg.latent_channels, latent_frames, h, w, generator=g),
        face_pixel_values=torch.rand(batch, 3, 4 * latent_frames - 3, s, s, generator=g) * 2 - 1,
    )


def peer_forward(peer: WanAnimateTransformer3DModel, inputs: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """diffusers takes [x | y] as one 36-channel tensor and keyword names of its own."""
    cast = {k: v.to(dtype) for k, v in inputs.items() if k != "t"}
    with torch.no_grad():
        return peer(
            hidden_states=torch.cat([cast["x"], cast["y"]], dim=1),
            timestep=inputs["t"],
            encoder_hidden_states=cast["context"],
            encoder_hidden_states_image=cast["clip_fea"],
            pose_hidden_states=cast["pose_latents"],
            face_pixel_values=cast["face_pixel_values"],
            return_dict=False,
        )[0].float()


def ours_via_key_map(cfg: WanAnimateConfig, peer) -> WanAnimateDiT:
    model = WanAnimateDiT(cfg).eval()
    model.load_state_dict(diffusers_to_official(peer.state_dict(), cfg), strict=True)
    return model


def ours_via_load_dit(cfg: WanAnimateConfig, peer, tmp_path) -> WanAnimateDiT:
    peer.save_pretrained(tmp_path / "peer")
    model = load_dit(tmp_path / "peer", dtype=torch.float32)
    assert model.config.to_dict() == cfg.to_dict()
    return model


CASES = [("tiny", "key_map"), ("tiny_b", "load_dit")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{p}-{how}" for p, how in CASES])
def pair(request, tmp_path_factory):
    preset, how = request.param
    cfg = WanAnimateConfig.preset(preset)
    peer = make_peer(cfg, seed=len(preset))
    if how == "key_map":
        ours = ours_via_key_map(cfg, peer)
    else:
        ours = ours_via_load_dit(cfg, peer, tmp_path_factory.mktemp(preset))
    inputs = make_inputs(cfg, seed=3)
    return cfg, peer, ours, inputs, peer_forward(peer, inputs)


# ------------------------------------------------------------------------------------------------
# fp32: equal to 1e-5
# ------------------------------------------------------------------------------------------------


def test_fp32_parity(pair):
    cfg, _, ours, inputs, ref = pair
    with torch.no_grad():
        out = ours(**inputs)
    assert out.dtype == torch.float32 and out.shape == ref.shape == inputs["x"].shape
    assert ref.abs().mean() > 0.1  # a real signal, not a degenerate all-zero output
    assert rel_err(out, ref) <= FP32_TOL, rel_err(out, ref)


def test_fp32_gradient_parity(pair):
    """Backward agrees too (our norms and RoPE have hand-written backwards): every parameter's
    gradient, mapped to diffusers names, matches the peer's."""
    cfg, peer, ours, inputs, _ = pair
    probe = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(7))
    ours.zero_grad()
    (ours(**inputs) * probe).sum().backward()
    peer.zero_grad()
    with torch.enable_grad():
        out = peer(
            hidden_states=torch.cat([inputs["x"], inputs["y"]], dim=1), timestep=inputs["t"],
            encoder_hidden_states=inputs["context"], encoder_hidden_states_image=inputs["clip_fea"],
            pose_hidden_states=inputs["pose_latents"], face_pixel_values=inputs["face_pixel_values"],
            return_dict=False,
        )[0]
        (out * probe).sum().backward()
    ours_grads = official_to_diffusers({n: p.grad for n, p in ours.named_parameters()}, cfg)
    peer_grads = {n: p.grad for n, p in peer.named_parameters()}
    assert ours_grads.keys() == peer_grads.keys()
    worst = max(rel_err(ours_grads[n], peer_grads[n]) for n in peer_grads)
    assert worst <= 1e-4, worst
    ours.zero_grad(set_to_none=True)
    peer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "name",
    [
        "face_encoder.padding_tokens",
        "motion_encoder.dec.direction.weight",
        "motion_encoder.enc.net_app.convs.1.conv2.1.weight",
        "face_adapter.fuser_blocks.0.linear1_kv.weight",
        "blocks.0.cross_attn.k_img.weight",
        "pose_patch_embedding.weight",
        "blocks.1.self_attn.norm_k.weight",
        "head.modulation",
    ],
)
def test_negative_control_one_perturbed_tensor_breaks_parity(pair, name):
    """Parity is sensitive to every part: nudging one tensor by 5% of its size fails it."""
    _, _, ours, inputs, ref = pair
    param = ours.get_parameter(name)
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.add_(0.05 * param.abs().mean() * torch.randn_like(param))
            out = ours(**inputs)
        assert rel_err(out, ref) > 10 * FP32_TOL, (name, rel_err(out, ref))
    finally:
        with torch.no_grad():
            param.copy_(saved)


def test_negative_control_swapped_kv_halves(pair):
    """The face adapter's packed k/v order matters (a wrong split would go unnoticed otherwise)."""
    _, _, ours, inputs, ref = pair
    kv = ours.face_adapter.fuser_blocks[0].linear1_kv
    saved = kv.weight.detach().clone(), kv.bias.detach().clone()
    try:
        with torch.no_grad():
            kv.weight.copy_(torch.cat(saved[0].chunk(2)[::-1]))
            kv.bias.copy_(torch.cat(saved[1].chunk(2)[::-1]))
            out = ours(**inputs)
        assert rel_err(out, ref) > 10 * FP32_TOL
    finally:
        with torch.no_grad():
            kv.weight.copy_(saved[0])
            kv.bias.copy_(saved[1])


# ------------------------------------------------------------------------------------------------
# bf16: within bf16 tolerance, and at least as close to the fp32 truth as the peer
# ------------------------------------------------------------------------------------------------


def test_bf16_parity(pair):
    cfg, peer, ours, inputs, ref = pair
    ours16 = WanAnimateDiT(cfg).eval()
    ours16.load_state_dict(ours.state_dict())
    set_precision(ours16, torch.bfloat16)
    peer16 = make_peer(cfg, seed=0)
    peer16.load_state_dict(peer.state_dict())
    peer16.to(torch.bfloat16)  # diffusers' bf16: everything bf16 incl. the residual stream

    with torch.no_grad():
        out16 = ours16(**inputs)
    ref16 = peer_forward(peer16, inputs, torch.bfloat16)
    assert out16.dtype == torch.float32
    err_ours, err_peer = rel_err(out16, ref), rel_err(ref16, ref)
    assert err_ours < 2e-2, err_ours  # bf16 has 8 mantissa bits; a few rounding steps deep
    assert rel_err(out16, ref16) < 3e-2
    # fp32 residual/modulation/head (official recipe) is no less accurate than the all-bf16 peer
    assert err_ours <= 1.25 * err_peer, (err_ours, err_peer)
