"""WanAnimateDiT: shapes, dtypes, the 14B parameter/key set, RoPE, checkpointing, no host syncs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_dit_inputs

from wan_animate.config import WanAnimateConfig
from wan_animate.model import (
    ADAPTER_PREFIXES,
    WanAnimateDiT,
    apply_activation_checkpointing,
    is_fp32_by_design,
    set_precision,
)
from wan_animate.model.rope import apply_rope, build_rope_tables

# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return WanAnimateDiT(WanAnimateConfig.preset("tiny")).eval()


# ------------------------------------------------------------------------------------------------
# Shapes and dtypes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny_b"])
def test_forward_shapes_and_dtypes(preset):
    cfg = WanAnimateConfig.preset(preset)
    model = WanAnimateDiT(cfg).eval()
    inputs = make_dit_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == inputs["x"].shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()

    set_precision(model, torch.bfloat16)
    with torch.no_grad():
        out_bf16 = model(**inputs)
    assert out_bf16.dtype == torch.float32 and out_bf16.shape == out.shape
    rel = (out_bf16 - out).norm() / out.norm()
    assert 0 < rel < 3e-2, rel  # bf16 matmuls, not a different function


def test_every_input_matters(tiny_model):
    """Each conditioning input changes the output (no silently ignored argument)."""
    cfg = tiny_model.config
    inputs = make_dit_inputs(cfg)
    with torch.no_grad():
        base = tiny_model(**inputs)
        for name in inputs:
            changed = dict(inputs)
            noise = torch.randn_like(inputs[name]) * 0.5  # not a constant shift: LayerNorms absorb those
            changed[name] = inputs[name] + noise if name != "t" else inputs[name] * 0.5
            diff = (tiny_model(**changed) - base).abs().max()
            assert diff > 1e-4, f"output does not depend on {name}"
        # the pose of target frames never touches the reference slot's input tokens, but the
        # reference slot's output still changes through attention: check slot 0 of x is used too
        changed = dict(inputs, x=inputs["x"].clone())
        changed["x"][:, :, 0] += 1
        assert (tiny_model(**changed) - base).abs().max() > 1e-4


def test_bad_face_frame_count_is_a_clear_error(tiny_model):
    inputs = make_dit_inputs(tiny_model.config)
    inputs["face_pixel_values"] = inputs["face_pixel_values"][:, :, :2]
    with pytest.raises(ValueError, match=r"4\*T-3 face frames"):
        tiny_model(**inputs)
    inputs = make_dit_inputs(tiny_model.config)
    inputs["pose_latents"] = inputs["pose_latents"][:, :, :1]
    with pytest.raises(ValueError, match="pose_latents must have shape"):
        tiny_model(**inputs)


# ------------------------------------------------------------------------------------------------
# 14B: parameter count and the official key set
# ------------------------------------------------------------------------------------------------


def official_14b_keys() -> set[str]:
    """The official Wan2.2-Animate-14B key set, written from the documented name patterns."""
    keys: set[str] = set()

    def wb(prefix: str) -> None:
        keys.update({f"{prefix}.weight", f"{prefix}.bias"})

    for p in ("patch_embedding", "pose_patch_embedding", "text_embedding.0", "text_embedding.2",
              "time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"):
        wb(p)
    keys.add("head.modulation")
    for n in range(40):
        b = f"blocks.{n}"
        keys.add(f"{b}.modulation")
        for p in ("q", "k", "v", "o"):
            wb(f"{b}.self_attn.{p}")
        keys.update({f"{b}.self_attn.norm_q.weight", f"{b}.self_attn.norm_k.weight"})
        wb(f"{b}.norm3")
        for p in ("q", "k", "v", "o", "k_img", "v_img"):
            wb(f"{b}.cross_attn.{p}")
        keys.update({f"{b}.cross_attn.norm_{p}.weight" for p in ("q", "k", "k_img")})
        wb(f"{b}.ffn.0")
        wb(f"{b}.ffn.2")
    for i in (0, 1, 3, 4):
        wb(f"img_emb.proj.{i}")
    app = "motion_encoder.enc.net_app.convs"
    keys.update({f"{app}.0.0.weight", f"{app}.0.1.bias", f"{app}.8.weight"})
    for i in range(1, 8):
        keys.update({f"{app}.{i}.{s}" for s in ("conv1.0.weight", "conv1.1.bias", "conv2.0.kernel",
                                                  "conv2.1.weight", "conv2.2.bias", "skip.0.kernel",
                                                  "skip.1.weight")})
    for i in range(5):
        wb(f"motion_encoder.enc.fc.{i}")
    keys.add("motion_encoder.dec.direction.weight")
    for k in range(8):
        for p in ("linear1_kv", "linear1_q", "linear2"):
            wb(f"face_adapter.fuser_blocks.{k}.{p}")
        keys.update({f"face_adapter.fuser_blocks.{k}.q_norm.weight", f"face_adapter.fuser_blocks.{k}.k_norm.weight"})
    for p in ("conv1_local", "conv2", "conv3"):
        wb(f"face_encoder.{p}.conv")
    wb("face_encoder.out_proj")
    keys.add("face_encoder.padding_tokens")
    return keys


def test_14b_on_meta_has_published_size_and_official_keys():
    with torch.device("meta"):
        model = WanAnimateDiT(WanAnimateConfig.preset("14b"))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 17_274_816_884
    buffers = dict(model.named_buffers())
    assert len(buffers) == 14 and all(name.endswith(".kernel") and b.shape == (4, 4) for name, b in buffers.items())

    sd = model.state_dict()
    expected = official_14b_keys()
    assert len(expected) == 1441
    assert set(sd) == expected, (sorted(set(sd) - expected)[:5], sorted(expected - set(sd))[:5])

    shapes = {
        "face_adapter.fuser_blocks.0.linear1_kv.weight": (10240, 5120),
        "motion_encoder.dec.direction.weight": (512, 20),
        "motion_encoder.enc.net_app.convs.8.weight": (512, 512, 4, 4),
        "motion_encoder.enc.net_app.convs.0.1.bias": (1, 32, 1, 1),
        "motion_encoder.enc.net_app.convs.7.conv2.2.bias": (1, 512, 1, 1),
        "motion_encoder.enc.fc.4.weight": (20, 512),
        "face_encoder.conv1_local.conv.weight": (4096, 512, 3),
        "face_encoder.padding_tokens": (1, 1, 1, 5120),
        "blocks.0.modulation": (1, 6, 5120),
        "head.modulation": (1, 2, 5120),
        "head.head.weight": (64, 5120),
        "patch_embedding.weight": (5120, 36, 1, 2, 2),
        "img_emb.proj.1.weight": (1280, 1280),
        "blocks.0.self_attn.norm_q.weight": (5120,),
        "face_adapter.fuser_blocks.0.q_norm.weight": (128,),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    # adapter prefixes name real top-level modules and cover every non-trunk tensor
    top = {name.split(".")[0] for name in sd}
    assert set(ADAPTER_PREFIXES) <= top
    adapter = sum(p.numel() for n, p in model.named_parameters() if n.startswith(ADAPTER_PREFIXES))
    assert adapter > 0.8e9  # face adapter alone is 839M


# ------------------------------------------------------------------------------------------------
# RoPE against a plain complex-number reference
# ------------------------------------------------------------------------------------------------


def rope_complex_reference(x: torch.Tensor, grid, split, theta=10000.0) -> torch.Tensor:
    """Per-axis complex rotations written the textbook way (float64/complex128)."""
    f, h, w = grid
    parts = []
    for n, d in zip(grid, split):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        parts.append(torch.polar(torch.ones(n, d // 2, dtype=torch.float64),
                                 torch.outer(torch.arange(n, dtype=torch.float64), freqs)))
    ft, fh, fw = parts
    rot = torch.cat([
        ft[:, None, None].expand(f, h, w, -1),
        fh[None, :, None].expand(f, h, w, -1),
        fw[None, None, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(-2)


@pytest.mark.parametrize("head_dim,grid", [(128, (3, 4, 5)), (32, (2, 3, 2)), (24, (4, 2, 3))])
def test_rope_matches_complex_reference(head_dim, grid):
    cfg = WanAnimateConfig(dim=head_dim * 2, num_heads=2)
    split = cfg.rope_split
    x = torch.randn(2, math.prod(grid), 2, head_dim)
    cos, sin = build_rope_tables(grid, split)
    assert cos.dtype == torch.float32 and cos.shape == (math.prod(grid), head_dim // 2)
    got = apply_rope(x, cos, sin)
    ref = rope_complex_reference(x, grid, split)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # a wrong axis split is caught by the reference
    bad = apply_rope(x, *build_rope_tables(grid, (split[1], split[0], split[2])))
    assert (bad.double() - ref).abs().max() > 1e-2 or split[0] == split[1]


def test_rope_tables_are_cached(tiny_model):
    a = tiny_model.rope((2, 3, 4), torch.device("cpu"))
    b = tiny_model.rope((2, 3, 4), torch.device("cpu"))
    assert a[0] is b[0] and a[1] is b[1]


# ------------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------------


def test_set_precision_keeps_fp32_tables():
    model = set_precision(WanAnimateDiT(WanAnimateConfig.preset("tiny")), torch.bfloat16)
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    must_fp32 = ["blocks.0.modulation", "head.modulation", "head.head.weight", "time_embedding.0.weight",
                 "time_projection.1.bias", "blocks.0.norm3.weight", "blocks.1.self_attn.norm_q.weight",
                 "blocks.0.cross_attn.norm_k_img.weight", "img_emb.proj.0.weight",
                 "face_adapter.fuser_blocks.0.k_norm.weight", "motion_encoder.dec.direction.weight",
                 "motion_encoder.enc.net_app.convs.1.conv2.0.kernel"]
    must_bf16 = ["blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "blocks.0.cross_attn.k_img.bias",
                 "patch_embedding.weight", "text_embedding.0.weight", "img_emb.proj.1.weight",
                 "face_adapter.fuser_blocks.0.linear1_kv.weight", "face_encoder.padding_tokens",
                 "motion_encoder.enc.net_app.convs.1.conv1.0.weight", "motion_encoder.enc.fc.0.weight"]
    for n in must_fp32:
        assert dtypes[n] == torch.float32 and is_fp32_by_design(n), n
    for n in must_bf16:
        assert dtypes[n] == torch.bfloat16 and not is_fp32_by_design(n), n
    n_fp32 = sum(t.numel() for n, t in model.named_parameters() if t.dtype == torch.float32)
    assert n_fp32 < 0.5 * sum(t.numel() for t in model.parameters())


def test_fp32_by_design_layers_compute_in_fp32_under_autocast():
    """The plain bf16 path runs the DiT under autocast: the time embedding / projection and the
    head, fp32 by design (as the official model, and the DeepSpeed path), must not be computed in
    bf16 there."""
    model = set_precision(WanAnimateDiT(WanAnimateConfig.preset("tiny")), torch.bfloat16)
    seen = {}
    for name in ("time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"):
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**make_dit_inputs(model.config))
    assert seen == dict.fromkeys(seen, torch.float32) and len(seen) == 4, seen


# ------------------------------------------------------------------------------------------------
# Activation checkpointing
# ------------------------------------------------------------------------------------------------


def test_activation_checkpointing_same_gradients():
    cfg = WanAnimateConfig.preset("tiny")
    plain = WanAnimateDiT(cfg)
    ckpt = WanAnimateDiT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)
    apply_activation_checkpointing(ckpt)  # idempotent
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # names unchanged
    inputs = make_dit_inputs(cfg)

    calls = {"n": 0}
    ckpt.blocks[1].self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(**inputs).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls["n"] == 2  # forward + recomputation in backward
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if not n.endswith(".kernel")), "a parameter gets no gradient"


# ------------------------------------------------------------------------------------------------
# Fast-path properties: no host syncs, traceable as one graph
# ------------------------------------------------------------------------------------------------


def test_forward_has_no_host_syncs(tiny_model, monkeypatch):
    inputs = make_dit_inputs(tiny_model.config)
    tiny_model(**inputs)  # fill the RoPE cache outside the guarded call

    def forbidden(*_a, **_k):
        raise AssertionError("host-device sync inside forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with torch.no_grad():
        out = tiny_model(**inputs)
    monkeypatch.undo()
    assert out.shape == inputs["x"].shape


def test_forward_traces_as_one_graph(tiny_model):
    inputs = make_dit_inputs(tiny_model.config)
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model, backend="eager", fullgraph=True)
    with torch.no_grad():
        ref = tiny_model(**inputs)
        out = compiled(**inputs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_rope_backward_is_inverse_rotation():
    """The custom backward (inverse rotation, nothing saved) equals autograd through the plain formula."""
    grid, split = (2, 3, 4), WanAnimateConfig(dim=64, num_heads=2).rope_split
    cos, sin = build_rope_tables(grid, split)
    x = torch.randn(2, math.prod(grid), 2, 32, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, math.prod(grid), 2, 32, dtype=torch.float64)
    (apply_rope(x, cos, sin) * grad).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    (rope_complex_reference(ref_x, grid, split) * grad).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    xb = torch.randn(1, math.prod(grid), 2, 32, dtype=torch.bfloat16, requires_grad=True)
    apply_rope(xb, cos, sin).sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_patch_embedding_matmul_equals_conv3d():
    from wan_animate.model.dit import PatchEmbedding

    conv = torch.nn.Conv3d(36, 24, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    fast = PatchEmbedding(36, 24, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    fast.load_state_dict(conv.state_dict())
    video = torch.randn(2, 36, 3, 4, 6)
    torch.testing.assert_close(fast(video), conv(video), rtol=1e-5, atol=1e-6)
    assert isinstance(fast, torch.nn.Conv3d)  # adapter libraries see a Conv3d


def test_every_parameter_is_used_through_its_own_module_forward(tiny_model):
    """Sharding hooks (FSDP / ZeRO-3) gather a module's own parameters when its forward runs, so
    every parameter's owning module must run its forward (no weight read from outside)."""
    ran: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: ran.add(id(mod))) for m in tiny_model.modules()]
    try:
        with torch.no_grad():
            tiny_model(**make_dit_inputs(tiny_model.config))
    finally:
        for hook in hooks:
            hook.remove()
    not_run = [
        f"{module_name}.{name}"
        for module_name, module in tiny_model.named_modules()
        for name, _ in module.named_parameters(recurse=False)
        if id(module) not in ran
    ]
    assert not not_run, not_run[:5]


# ------------------------------------------------------------------------------------------------
# Hand-written norm backwards against autograd through the plain formulas
# ------------------------------------------------------------------------------------------------


def test_fused_norm_backwards_match_autograd():
    from wan_animate.model.norms import modulated_layer_norm, rms_norm

    def grads(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(weight_grad)
        return out.detach(), [leaf.grad for leaf in leaves]

    x = torch.randn(2, 7, 16)
    w, scale, shift = 1 + 0.3 * torch.randn(16), 0.3 * torch.randn(2, 1, 16), 0.3 * torch.randn(2, 1, 16)
    weight_grad = torch.randn(2, 7, 16)
    ours = grads(lambda a, b: rms_norm(a, b, 1e-6), x, w)
    ref = grads(lambda a, b: torch.nn.functional.rms_norm(a, (16,), b, 1e-6), x, w)
    for a, b in zip([ours[0], *ours[1]], [ref[0], *ref[1]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ours = grads(lambda a, s, t: modulated_layer_norm(a, s, t, 1e-6, torch.float32), x, scale, shift)
    ref = grads(lambda a, s, t: torch.nn.functional.layer_norm(a, (16,), eps=1e-6) * (1 + s) + t, x, scale, shift)
    for a, b in zip([ours[0], *ours[1]], [ref[0], *ref[1]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # values equal the library ops they replace
    xs = torch.randn(3, 5, 32)
    ws, sc, sh = torch.randn(32), torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    torch.testing.assert_close(rms_norm(xs, ws, 1e-6), torch.nn.functional.rms_norm(xs, (32,), ws, 1e-6))
    ref = torch.nn.functional.layer_norm(xs, (32,), eps=1e-6) * (1 + sc) + sh
    torch.testing.assert_close(modulated_layer_norm(xs, sc, sh, 1e-6, torch.float32), ref, rtol=1e-5, atol=1e-5)
    # bf16 inputs keep their dtype in the gradient and are not upcast in what is saved
    xb = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    rms_norm(xb, ws, 1e-6).sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_compile_blocks_with_checkpointing_traces_each_block_whole():
    """Regional compilation (fullgraph per block: the custom-backward norms and RoPE trace) under
    activation checkpointing gives the plain model's output and gradients."""
    from wan_animate.model import compile_blocks

    cfg = WanAnimateConfig.preset("tiny")
    plain = WanAnimateDiT(cfg)
    fast = WanAnimateDiT(cfg)
    fast.load_state_dict(plain.state_dict())
    torch._dynamo.reset()
    compile_blocks(fast, backend="eager", fullgraph=True)
    apply_activation_checkpointing(fast)
    inputs = make_dit_inputs(cfg)
    outs, grads = [], []
    for model in (plain, fast):
        out = model(**inputs)
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append(model.blocks[2].self_attn.q.weight.grad)
    torch._dynamo.reset()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_compile_blocks_compiles_only_the_blocks_own_code(monkeypatch):
    """Block swap's stream/event copies and the offload hooks wrap a block's forward from outside;
    the compiled region is the block's own forward (not ``Module.__call__`` with whatever wraps it),
    and compiling after those wrappers is refused."""
    from types import SimpleNamespace

    from wan_animate.memory import apply_memory_options
    from wan_animate.model import compile_blocks

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    model = WanAnimateDiT(WanAnimateConfig.preset("tiny"))
    compile_blocks(model)
    blocks = [*model.blocks, *model.face_adapter.fuser_blocks]
    assert len(compiled) == len(blocks)
    assert all(getattr(fn, "__func__", None) is type(b).forward and fn.__self__ is b for fn, b in zip(compiled, blocks))

    swapped = WanAnimateDiT(WanAnimateConfig.preset("tiny"))
    for p in swapped.parameters():
        p.requires_grad_(False)
    apply_memory_options(swapped, SimpleNamespace(activation_checkpointing=True, block_swap=1, base_dtype="bf16",
                                                  checkpoint_offload=True, checkpoint_dtype="fp32",
                                                  motion_encoder_chunk=0), device="cpu")
    with pytest.raises(RuntimeError, match="before activation checkpointing and the memory options"):
        compile_blocks(swapped)
