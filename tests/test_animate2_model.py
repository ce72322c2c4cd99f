"""Animate-2 DiT: parity with diffusers 0.42.1, the in-context attention kernels, the passes."""

from __future__ import annotations

import pytest
import torch

from wan_animate.animate2 import Animate2Config, Animate2DiT, driving_condition
from wan_animate.animate2.attention import InContextLayout, incontext_attention, incontext_bias
from wan_animate.animate2.keymap import detect_family, diffusers_to_official, official_to_diffusers


def _config(**kw) -> Animate2Config:
    base = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=24, text_len=8,
                uncond_skip_blocks=())
    return Animate2Config(**{**base, **kw})


def _diffusers_model(cfg: Animate2Config):
    import diffusers.models.transformers.transformer_wan_animate_2 as dm

    kw = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    return dm.WanAnimate2Transformer3DModel(**kw).eval()


@pytest.fixture
def eager_block_mask(monkeypatch):
    """diffusers builds its BlockMask with ``_compile=True`` (a ~15 s CPU compile); the same mask
    function built eagerly is the same mask."""
    import diffusers.models.transformers.transformer_wan_animate_2 as dm

    original = dm.create_block_mask
    monkeypatch.setattr(dm, "create_block_mask", lambda *a, **k: original(*a, **{**k, "_compile": False}))
    return dm


def _inputs(cfg, gen_frames, drv_frames, h, w, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        driving=r(batch, 16, drv_frames, h, w), context_ref=r(batch, cfg.text_len, cfg.text_dim),
        clip_ref=r(batch, 5, cfg.image_dim), x=r(batch, 16, gen_frames, h, w), y=r(batch, 20, gen_frames, h, w),
        context=r(batch, cfg.text_len, cfg.text_dim), clip_fea=r(batch, 5, cfg.image_dim),
        t=torch.full((batch,), 637.0),
    )


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------
# Parity with diffusers' WanAnimate2Transformer3DModel (random weights, fp32)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    # (config overrides, latent frames of the driving segment, latent H, W, uncond branch)
    (dict(), 3, 4, 6, False),
    (dict(num_heads=4, dim=64, refer_offset_t=0, refer_offset_h=-1, refer_offset_w=2), 2, 6, 4, False),
    (dict(refer_offset_t=-1, refer_offset_w=-1, refer_stride=2), 4, 2, 8, False),
    pytest.param((dict(num_layers=10, uncond_skip_blocks=(9,)), 2, 4, 4, True), marks=pytest.mark.slow),
], ids=["default-offsets", "heads4-offsets-h", "stride2-offset-t", "uncond-skip-block9"])
def test_parity_with_diffusers(case, eager_block_mask):
    overrides, fd, h, w, uncond = case
    dm = eager_block_mask
    cfg = _config(**overrides)
    torch.manual_seed(1)
    ours = Animate2DiT(cfg).eval()
    ref = _diffusers_model(cfg)
    ref.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    inp = _inputs(cfg, fd + 1, fd, h, w)
    grid_ref = torch.tensor([[fd, h // 2, w // 2]])
    with torch.no_grad():
        cache_ref = dm.WanAnimate2KVCache(cfg.num_layers)
        ref([inp["driving"][0]], timestep=inp["t"], encoder_hidden_states=[inp["context_ref"][0]],
            condition_latents=[driving_condition(inp["driving"])[0]], kv_cache=cache_ref, kv_cache_mode="extract",
            seq_len=fd * h * w // 4, encoder_hidden_states_image=inp["clip_ref"], offset_grid_sizes=grid_ref)
        expected = ref([inp["x"][0]], timestep=inp["t"], encoder_hidden_states=[inp["context"][0]],
                       condition_latents=[inp["y"][0]], kv_cache=cache_ref, kv_cache_mode="cached",
                       seq_len=(fd + 1) * h * w // 4, encoder_hidden_states_image=inp["clip_fea"],
                       reference_grid_sizes=grid_ref, origin_len=4 * (fd - 1) + 1, origin_area=[h * 8, w * 8],
                       is_uncondtion=uncond).sample[0]
        cache = ours.extract(inp["driving"], inp["context_ref"], inp["clip_ref"])
        for i in range(cfg.num_layers):  # the cache itself: K before RoPE, V
            assert _rel(cache.keys[i][0], cache_ref.get(i).key[0]) < 1e-5
            assert _rel(cache.values[i][0], cache_ref.get(i).value[0]) < 1e-5
        skip = cfg.uncond_skip_blocks if uncond else ()
        got = ours.generate(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], cache, skip_blocks=skip)[0]
    assert _rel(got, expected) < 1e-5
    if uncond:  # the skip changes the output (the test would not see a missing skip otherwise)
        with torch.no_grad():
            full = ours.generate(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], cache)[0]
        assert _rel(full, expected) > 1e-3


def test_joint_pass_equals_extract_then_generate_and_trains_both_streams():
    cfg = _config(log_scale=-1.3)
    torch.manual_seed(2)
    model = Animate2DiT(cfg)
    inp = _inputs(cfg, 4, 3, 4, 4, batch=2)
    with torch.no_grad():
        cache = model.extract(inp["driving"], inp["context_ref"], inp["clip_ref"])
        two_pass = model.generate(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], cache)
    joint = model(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], inp["driving"],
                  inp["context_ref"], inp["clip_ref"])
    assert _rel(joint.detach(), two_pass) < 1e-6
    joint.square().mean().backward()
    # gradients reach the driving stream: the text embedding of the reference prompt path and the
    # driving latents' patch embedding both get them through the in-context keys
    driving = inp["driving"].clone().requires_grad_(True)
    model.zero_grad()
    model(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], driving, inp["context_ref"],
          inp["clip_ref"]).square().mean().backward()
    assert driving.grad is not None and driving.grad.abs().sum() > 0


def test_activation_checkpointing_and_bf16_match_the_plain_path():
    from wan_animate.model import apply_activation_checkpointing, set_precision

    cfg = _config()
    inp = _inputs(cfg, 3, 2, 4, 4)
    args = [inp[k] for k in ("x", "t", "context", "clip_fea", "y", "driving", "context_ref", "clip_ref")]
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(7)
        model = Animate2DiT(cfg)
        if checkpointed:
            apply_activation_checkpointing(model)
        out = model(*args)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # bf16 matmuls with the fp32-by-design tensors kept: close to fp32, and the cache in bf16
    torch.manual_seed(7)
    model = Animate2DiT(cfg).eval()
    with torch.no_grad():
        ref = model(*args)
        set_precision(model, torch.bfloat16)
        assert model.blocks[0].block.modulation.dtype == torch.float32
        cache = model.extract(inp["driving"], inp["context_ref"], inp["clip_ref"])
        assert cache.keys[0].dtype == torch.bfloat16
        low = model.generate(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], cache)
    assert low.dtype == torch.float32 and _rel(low, ref) < 5e-2


def test_driving_frame_alignment():
    """Generation frame f sees driving frame f-1 only: changing driving frame 1 changes generation
    frames 2 (and, through the generation tokens of later blocks, others) but with one block only
    frame 2 directly."""
    cfg = _config(num_layers=1)
    torch.manual_seed(3)
    model = Animate2DiT(cfg).eval()
    inp = _inputs(cfg, 4, 3, 4, 4)
    with torch.no_grad():
        base = model(**{k: inp[k] for k in ("x", "t", "context", "clip_fea", "y", "driving", "context_ref", "clip_ref")})
        drv = inp["driving"].clone()
        drv[:, :, 1] += 1.0
        moved = model(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], drv, inp["context_ref"],
                      inp["clip_ref"])
    change = (moved - base).abs().amax(dim=(0, 1, 3, 4))  # per generation frame
    assert change[2] > 1e-4
    assert torch.all(change[[0, 1, 3]] == 0)


# ------------------------------------------------------------------------------------------------
# In-context attention kernels
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gen_frames,drv_frames,hw,log_scale", [
    (4, 3, 6, 0.0), (4, 3, 6, -1.3), (3, 5, 5, 0.7), (5, 2, 7, 0.0), (1, 2, 4, -1.3)])
def test_incontext_kernels_equal_dense(gen_frames, drv_frames, hw, log_scale):
    layout = InContextLayout(gen_frames, drv_frames, hw)
    g = torch.Generator().manual_seed(4)
    b, h, d = 2, 3, 8
    q, k, v = (torch.randn(b, layout.gen_len, h, d, generator=g) for _ in range(3))
    kd, vd = (torch.randn(b, layout.drv_len, h, d, generator=g) for _ in range(2))
    dense = incontext_attention(q, k, v, kd, vd, layout, log_scale, backend="dense")
    # dense against a direct softmax over the bias (the mask's meaning, written out)
    bias = incontext_bias(layout, log_scale, "cpu")
    scores = torch.einsum("bqhd,bkhd->bhqk", q, torch.cat([k, kd], 1)) / d**0.5 + bias
    direct = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), torch.cat([v, vd], 1))
    torch.testing.assert_close(dense, direct, rtol=1e-5, atol=1e-6)
    for backend in ("split", "flex"):
        got = incontext_attention(q, k, v, kd, vd, layout, log_scale, backend=backend)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6, msg=backend)


def test_incontext_mask_meaning():
    layout = InContextLayout(3, 2, 2)
    bias = incontext_bias(layout, -1.3, "cpu")
    allowed = torch.isfinite(bias)
    assert allowed[:, :6].all()  # every query sees every generation key
    assert not allowed[0:2, 6:].any()  # the reference slot sees no driving token
    assert allowed[2:4, 6:8].all() and not allowed[2:4, 8:].any()  # frame 1 -> driving frame 0
    assert allowed[4:6, 8:10].all() and not allowed[4:6, 6:8].any()  # frame 2 -> driving frame 1
    assert torch.all(bias[:, 2:4] == -1.3) and torch.all(bias[:, :2] == 0)  # keys of frame 1 scaled


def test_split_kernel_gradients_equal_dense():
    layout = InContextLayout(3, 2, 4)
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(1, n, 2, 8, generator=g, requires_grad=True)
               for n in (layout.gen_len,) * 3 + (layout.drv_len,) * 2]
    grads = {}
    for backend in ("dense", "split"):
        for t in tensors:
            t.grad = None
        incontext_attention(*tensors, layout, -1.3, backend=backend).square().sum().backward()
        grads[backend] = [t.grad.clone() for t in tensors]
    for a, b in zip(grads["split"], grads["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_flex_on_cpu_equals_dense(monkeypatch):
    """The compiled flex kernel (the GPU fast path's code, compiled by inductor for the CPU)."""
    import wan_animate.animate2.attention as attention

    monkeypatch.setattr(attention, "COMPILE_FLEX_ON_CPU", True)
    layout = InContextLayout(4, 3, 40)  # 160 generation tokens: not a multiple of the 128-token blocks
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, layout.gen_len, 2, 16, generator=g) for _ in range(3))
    kd, vd = (torch.randn(1, layout.drv_len, 2, 16, generator=g) for _ in range(2))
    for log_scale in (0.0, -1.3):
        dense = incontext_attention(q, k, v, kd, vd, layout, log_scale, backend="dense")
        got = incontext_attention(q, k, v, kd, vd, layout, log_scale, backend="flex")
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_incontext_fast_paths_equal_dense_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layout = InContextLayout(6, 5, 300)  # sizes not multiples of the 128-token blocks
    g = torch.Generator(device="cuda").manual_seed(6)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(1, layout.gen_len, 4, 64, generator=g, device="cuda", dtype=dtype) for _ in range(3))
        kd, vd = (torch.randn(1, layout.drv_len, 4, 64, generator=g, device="cuda", dtype=dtype) for _ in range(2))
        dense = incontext_attention(q.float(), k.float(), v.float(), kd.float(), vd.float(), layout, -1.3,
                                    backend="dense")
        with torch.no_grad():
            for backend in ("flex", "split"):
                got = incontext_attention(q, k, v, kd, vd, layout, -1.3, backend=backend).float()
                torch.testing.assert_close(got, dense, rtol=tol, atol=tol, msg=f"{backend} {dtype}")


# ------------------------------------------------------------------------------------------------
# Names and config
# ------------------------------------------------------------------------------------------------


def test_keymap_round_trip_and_family_detection():
    model = Animate2DiT(Animate2Config.preset("tiny"))
    sd = model.state_dict()
    diff = official_to_diffusers(sd)
    assert "blocks.0.self_attn.to_out.0.weight" in diff and "blocks.0.cross_attn.norm_added_k.weight" in diff
    assert "blocks.0.block.self_attn.o.weight" in sd
    back = diffusers_to_official(diff)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    assert detect_family(list(sd)) == ("animate2", "official")
    assert detect_family(list(diff)) == ("animate2", "diffusers")
    assert detect_family(["model.diffusion_model." + k for k in sd], "model.diffusion_model.") == ("animate2", "official")
    from wan_animate.config import WanAnimateConfig
    from wan_animate.model import WanAnimateDiT
    v1 = list(WanAnimateDiT(WanAnimateConfig.preset("tiny")).state_dict())
    assert detect_family(v1)[0] == "animate"


def test_diffusers_names_match_diffusers_class():
    cfg = Animate2Config.preset("tiny")
    ours = set(official_to_diffusers(Animate2DiT(cfg).state_dict()))
    assert ours == set(_diffusers_model(cfg).state_dict())


def test_config_round_trips_and_validation():
    for name in ("14b", "tiny"):
        cfg = Animate2Config.preset(name)
        assert Animate2Config.from_official_config(cfg.to_official_config()) == cfg
        assert Animate2Config.from_dict(cfg.to_dict()) == cfg
        assert Animate2Config.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    narrow = Animate2Config.preset("tiny_narrow")  # 32-wide CLIP tokens: the official layout only
    assert Animate2Config.from_official_config(narrow.to_official_config()) == narrow
    # a diffusers config.json written elsewhere: block 9 skipped when the model has it, no log_scale
    plain = {k: v for k, v in Animate2Config.preset("tiny").to_diffusers_config().items() if not k.startswith("_")}
    assert Animate2Config.from_diffusers_config(plain).uncond_skip_blocks == ()
    assert Animate2Config.from_diffusers_config({**plain, "num_layers": 40}).uncond_skip_blocks == (9,)
    assert Animate2Config().refer_offsets((21, 30, 52)) == (1, 0, 52)
    with pytest.raises(ValueError, match="uncond_skip_blocks"):
        Animate2Config(num_layers=4)
    with pytest.raises(ValueError, match="refer_offset_w"):
        _config(refer_offset_w=-2)
    with pytest.raises(ValueError, match="1280"):
        _config(image_dim=32).to_diffusers_config()


def test_14b_parameter_count():
    from wan_animate.weights.load import empty_model

    model = empty_model(lambda: Animate2DiT(Animate2Config.preset("14b")))
    n = sum(p.numel() for p in model.parameters())
    assert 16.0e9 < n < 16.6e9, n  # "~16.4 B" (the I2V-14B layout)


def test_bad_inputs_name_the_fix():
    cfg = _config()
    model = Animate2DiT(cfg)
    inp = _inputs(cfg, 3, 2, 4, 4)
    cache = model.extract(inp["driving"], inp["context_ref"], inp["clip_ref"])
    with pytest.raises(ValueError, match="differs from the generation grid"):
        model.generate(torch.randn(1, 16, 3, 4, 6), inp["t"], inp["context"], inp["clip_fea"],
                       torch.randn(1, 20, 3, 4, 6), cache)
    with pytest.raises(ValueError, match="condition of x"):
        model.generate(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"][:, :4], cache)


def test_fp32_by_design_time_path_and_head_compute_in_fp32_under_autocast():
    """The plain bf16 training path autocasts: the time embedding / projection and the head stay fp32."""
    from wan_animate.model import set_precision

    cfg = _config()
    model = set_precision(Animate2DiT(cfg), torch.bfloat16)
    seen = {}
    for name in ("time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"):
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, out.dtype))
    inp = _inputs(cfg, 4, 3, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], inp["driving"], inp["context_ref"],
              inp["clip_ref"])
    assert seen == dict.fromkeys(seen, torch.float32) and len(seen) == 4, seen
