"""Memory options (wan_animate.memory) against the plain path, on the tiny model on CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_assets
from wan_animate.config import WanAnimateConfig
from wan_animate.lora import add_lora
from wan_animate.memory import (
    FP8Linear,
    MemoryOptions,
    apply_memory_options,
    chunk_motion_encoder,
    lora_in_compute_dtype,
)
from wan_animate.model import ADAPTER_PREFIXES, WanAnimateDiT, set_precision
from wan_animate.objective import LossConfig, flow_matching_loss

# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    # Hundreds of tiny ops: thread hand-offs cost more than they save (10x on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def options(**kw) -> MemoryOptions:
    return MemoryOptions(**{"activation_checkpointing": True, **kw})


def make_batch(cfg: WanAnimateConfig, batch=1, latent_frames=2, h=4, w=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s, f = cfg.motion_encoder_size, 4 * latent_frames - 3

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "latents": rand(batch, cfg.out_dim, latent_frames + 1, h, w),
        "context": rand(batch, 16, cfg.text_dim),
        "clip_fea": rand(batch, 257, cfg.image_dim),
        "y": rand(batch, cfg.in_dim - cfg.out_dim, latent_frames + 1, h, w),
        "pose_latents": rand(batch, cfg.latent_channels, latent_frames, h, w),
        "face_pixel_values": (torch.rand(batch, 3, f, s, s, generator=g) * 2 - 1).to(dtype),
    }


def lora_model(seed=0, train_adapters=True, dtype=torch.float32, rank=4) -> WanAnimateDiT:
    """Tiny DiT, LoRA on the block linears, adapters trained or frozen, trainables fp32."""
    torch.manual_seed(seed)
    dit = WanAnimateDiT(WanAnimateConfig.preset("tiny"))
    set_precision(dit, dtype)
    add_lora(dit, rank=rank)
    for name, p in dit.named_parameters():
        trains = ".lora_" in name or (train_adapters and name.split(".", 1)[0] in ADAPTER_PREFIXES)
        p.requires_grad_(trains)
        if trains:
            p.data = p.data.float()
    with torch.no_grad():  # LoRA B starts at zero; make the factors matter from step 1
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    return dit.train()


def train_steps(dit: nn.Module, steps=3, lr=1e-3, autocast=False, device="cpu") -> tuple[list[torch.Tensor], dict]:
    """A few AdamW steps of the flow-matching loss with fixed draws; returns losses and final grads."""
    params = [p for p in dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, grads = [], {}
    for step in range(steps):
        batch = {k: v.to(device) for k, v in make_batch(dit.config, seed=step).items()}
        g = torch.Generator().manual_seed(100 + step)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            out = flow_matching_loss(dit, batch, LossConfig(), generator=g)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return losses, grads


def assert_bit_identical(a: tuple, b: tuple) -> None:
    (la, ga), (lb, gb) = a, b
    for x, y in zip(la, lb):
        assert torch.equal(x, y), (x.item(), y.item())
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


# ------------------------------------------------------------------------------------------------
# Block swap
# ------------------------------------------------------------------------------------------------


def test_block_swap_bit_identical_over_training_steps():
    plain = lora_model()
    swapped = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    apply_memory_options(plain, options(), device="cpu")
    state = apply_memory_options(swapped, options(block_swap=3), device="cpu")
    assert list(swapped.state_dict()) == keys  # names unchanged
    swap = state.block_swap
    assert swap.swapped == [0, 1, 2] and state.host_weight_bytes > 0
    # trainables never swap
    assert all(p.requires_grad is False for slots in swap.slots.values() for _, _, p in slots)
    assert any(".lora_" in n for n, p in swapped.blocks[0].named_parameters() if p.requires_grad)

    seen = []  # during a swapped block's call its base weights are the device copies
    base = swapped.blocks[1].ffn[0].base_layer
    param = base._parameters["weight"]
    base.register_forward_pre_hook(lambda m, a: seen.append(m._parameters["weight"] is not param))

    ref = train_steps(plain)
    got = train_steps(swapped)
    assert_bit_identical(ref, got)
    assert seen and all(seen)  # forward + recompute of every step used the copies
    assert base._parameters["weight"] is param  # restored after the call
    assert swap.copies == 6 + 5 + 5  # step 1: 0,1,2 + 2,1,0; then block 0 stays for the next forward
    assert swap.misses == 1  # only the very first block of the first step was not prefetched
    # negative control: the weights really come from the host copies
    with torch.no_grad():
        swap.slots[1][0][2].data.mul_(1.5)  # (block 0 is kept on the device between steps)
    assert not torch.equal(train_steps(swapped, steps=1)[0][0], train_steps(copy.deepcopy(plain), steps=1)[0][0])


def test_block_swap_without_checkpointing_runs_no_grad_only_and_exact():
    """Under autograd without checkpointing backward would keep every swapped block's device
    weights (nothing saved): refused, naming the fix; no-grad runs (inference) are exact."""
    plain = lora_model()
    swapped = copy.deepcopy(plain)
    apply_memory_options(plain, options(activation_checkpointing=False), device="cpu")
    apply_memory_options(swapped, options(activation_checkpointing=False, block_swap=4), device="cpu")
    with pytest.raises(RuntimeError, match="activation_checkpointing=true"):
        train_steps(swapped, steps=1)
    batch = make_batch(plain.config)
    with torch.no_grad():
        for _ in range(2):  # inference loop order (0..L-1 twice): wrong guesses cost copies, not results
            a = flow_matching_loss(plain, batch, generator=torch.Generator().manual_seed(0)).loss
            b = flow_matching_loss(swapped, batch, generator=torch.Generator().manual_seed(0)).loss
            assert torch.equal(a, b)


def test_block_swap_holds_each_block_in_one_exact_size_host_buffer():
    """Pinned bytes as allocated: one buffer per swapped block of exactly its weights' bytes (256-byte
    aligned each), not one caching-allocator block per weight (rounded up to a power of two)."""
    from wan_animate.memory.pinned import ALIGN, caching_host_bytes

    dit = lora_model()
    state = apply_memory_options(dit, options(block_swap=3, base_dtype="fp8"), device="cpu")
    swap = state.block_swap
    for index, slots in swap.slots.items():
        storages = {p.untyped_storage().data_ptr() for _, _, p in slots}
        assert len(storages) == 1, f"block {index}: {len(storages)} host allocations"
        sizes = [p.numel() * p.element_size() for _, _, p in slots]
        held = swap.buffers[index].nbytes
        assert slots[0][2].untyped_storage().nbytes() == held
        assert sum(sizes) <= held < sum(sizes) + ALIGN * len(sizes)
        assert held < sum(caching_host_bytes(n) for n in sizes)
    assert swap.host_bytes() == sum(b.nbytes for b in swap.buffers.values())


def test_checkpoint_offload_reuses_its_exact_size_host_buffers_every_step():
    dit = lora_model()
    state = apply_memory_options(dit, options(checkpoint_offload=True, checkpoint_dtype="bf16"), device="cpu")
    store = state.checkpoint_store
    train_steps(dit, steps=1)
    first = (store.pool.allocations, store.held_bytes, store.peak_bytes)
    assert first[0] == store.packed > 0  # one buffer per input alive at once ...
    train_steps(dit, steps=2)
    assert (store.pool.allocations, store.held_bytes) == first[:2]  # ... reused by the later steps
    assert store.held_bytes == first[2] and store.live_bytes == 0  # exact: the inputs' own bytes


def test_block_swap_after_checkpointing_is_refused():
    from wan_animate.model import apply_activation_checkpointing

    dit = apply_activation_checkpointing(lora_model())
    with pytest.raises(RuntimeError, match="before activation checkpointing"):
        apply_memory_options(dit, options(block_swap=1), device="cpu")


def test_block_swap_count_is_checked():
    with pytest.raises(ValueError, match="model.block_swap=9"):
        apply_memory_options(lora_model(), options(block_swap=9), device="cpu")


# ------------------------------------------------------------------------------------------------
# Checkpointed block inputs: host offload and bf16 storage
# ------------------------------------------------------------------------------------------------


def test_checkpoint_offload_bit_identical_and_stores_the_block_inputs():
    plain = lora_model()
    off = copy.deepcopy(plain)
    apply_memory_options(plain, options(), device="cpu")
    state = apply_memory_options(off, options(checkpoint_offload=True), device="cpu")
    assert_bit_identical(train_steps(plain), train_steps(off))
    store = state.checkpoint_store
    cfg = plain.config
    tokens = 2 + 1  # (latent_frames + 1) * (4/2) * (6/2) = 3 * 2 * 3 per sample
    hidden_bytes = 3 * 2 * 3 * cfg.dim * 4 * tokens // 3
    n_modules = cfg.num_layers + cfg.num_face_blocks
    assert store.packed == 3 * n_modules  # exactly the hidden state of every checkpointed module, each step
    assert store.peak_bytes == n_modules * hidden_bytes
    assert store.live_bytes == 0  # all released after backward
    # negative control: without the option nothing is packed
    assert apply_memory_options(lora_model(), options(), device="cpu").checkpoint_store is None


def test_checkpoint_dtype_bf16_is_a_small_measured_gradient_change():
    plain = lora_model()
    half = copy.deepcopy(plain)
    apply_memory_options(plain, options(), device="cpu")
    state = apply_memory_options(half, options(checkpoint_dtype="bf16", checkpoint_offload=True), device="cpu")
    (la, ga), (lb, gb) = train_steps(plain, steps=1), train_steps(half, steps=1)
    assert torch.equal(la[0], lb[0])  # the forward is unchanged
    rel = max(((ga[n] - gb[n]).norm() / ga[n].norm()).item() for n in ga if ga[n].norm() > 0)
    assert 0 < rel < 2e-2, rel  # not identical (the option acts), but close
    assert state.checkpoint_store.peak_bytes > 0


def test_checkpoint_options_need_checkpointing():
    with pytest.raises(ValueError, match="activation_checkpointing=true"):
        apply_memory_options(lora_model(), options(activation_checkpointing=False, checkpoint_offload=True),
                             device="cpu")


# ------------------------------------------------------------------------------------------------
# fp8 base weights
# ------------------------------------------------------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_base_weights_compose_with_lora_and_error_is_bounded():
    ref = lora_model(dtype=torch.bfloat16, train_adapters=False)
    q = copy.deepcopy(ref)
    keys = {k: v.dtype for k, v in ref.state_dict().items()}
    state = apply_memory_options(q, options(base_dtype="fp8"), device="cpu")
    apply_memory_options(ref, options(), device="cpu")
    layer = q.blocks[0].self_attn.q
    assert isinstance(layer.base_layer, FP8Linear) and layer.base_layer.weight_fp8.dtype == torch.float8_e4m3fn
    assert len(state.fp8_layers) == sum(1 for n in keys if n.startswith(("blocks.", "face_adapter."))
                                        and n.endswith("weight") and ".lora_" not in n
                                        and keys[n] == torch.bfloat16 and "norm" not in n)
    assert {k: v.dtype for k, v in q.state_dict().items()} == keys  # plain names and dtypes
    batch = make_batch(ref.config, dtype=torch.bfloat16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        out_ref = ref(batch["latents"], torch.full((1,), 500.0), *[batch[k] for k in
                      ("context", "clip_fea", "y", "pose_latents", "face_pixel_values")])
        out_q = q(batch["latents"], torch.full((1,), 500.0), *[batch[k] for k in
                  ("context", "clip_fea", "y", "pose_latents", "face_pixel_values")])
    err = relative_error(out_q, out_ref)
    assert 1e-4 < err < 0.08, err  # fp8 acts (negative control) and stays small
    # gradients of the LoRA factors flow through the fp8 base layers
    (lr_, gr), (lq, gq) = train_steps(ref, steps=1), train_steps(q, steps=1)
    assert abs(lq[0].item() - lr_[0].item()) / lr_[0].item() < 0.05
    worst = max(relative_error(gq[n], gr[n]) for n in gr)
    assert worst < 0.15, worst
    # the fp8 weight, not a dequantized copy, is what backward keeps
    saved = []
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        layer.base_layer(x)
    assert saved == [torch.float8_e4m3fn, torch.float32]


def test_fp8_state_dict_round_trip_and_full_mode_is_refused():
    lin = nn.Linear(32, 16).requires_grad_(False)
    q = FP8Linear(lin)
    sd = q.state_dict()
    assert set(sd) == {"weight", "bias"} and sd["weight"].dtype == torch.float32
    assert relative_error(sd["weight"], lin.weight) < 0.05
    q2 = FP8Linear(nn.Linear(32, 16).requires_grad_(False))
    q2.load_state_dict(sd)
    assert torch.equal(q2.weight_fp8.float(), q.weight_fp8.float())
    full = WanAnimateDiT(WanAnimateConfig.preset("tiny"))  # everything trains
    with pytest.raises(ValueError, match="base_dtype=fp8 found no frozen linear"):
        apply_memory_options(full, options(base_dtype="fp8"), device="cpu")


# ------------------------------------------------------------------------------------------------
# LoRA in the compute dtype
# ------------------------------------------------------------------------------------------------


def _fp32_saved_of_size(module: nn.Module, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, int]:
    big = []

    def pack(t):
        if t.dtype == torch.float32 and t.numel() >= x.numel():
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    return out, len(big)


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_runs_in_the_compute_dtype(autocast):
    dit = lora_model(dtype=torch.bfloat16, train_adapters=False)
    plain = copy.deepcopy(dit.blocks[0])
    fixed = copy.deepcopy(dit.blocks[0])
    assert lora_in_compute_dtype(fixed) == 4 + 6 + 2  # self-attn q,k,v,o; cross-attn + k_img, v_img; ffn
    x = torch.randn(1, 24, 64, dtype=torch.bfloat16, requires_grad=True)
    args = (torch.randn(1, 6, 64), torch.randn(1, 16, 64, dtype=torch.bfloat16),
            torch.randn(1, 8, 64, dtype=torch.bfloat16))
    cos, sin = dit.rope((1, 4, 6), x.device)
    ref, n_ref = _fp32_saved_of_size(lambda h: plain.ffn(h), x, autocast)
    out, n_out = _fp32_saved_of_size(lambda h: fixed.ffn(h), x, autocast)
    assert n_out == 0
    if not autocast:
        assert n_ref > 0  # negative control: peft's cast keeps an fp32 copy of the activation
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # whole block: same output, LoRA factors still get fp32 gradients
    h = torch.randn(1, 24, 64)
    fixed(h, args[0], args[1], args[2], cos, sin).pow(2).mean().backward()
    grads = [p.grad for n, p in fixed.named_parameters() if ".lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


# ------------------------------------------------------------------------------------------------
# Motion encoder chunks
# ------------------------------------------------------------------------------------------------


def test_motion_encoder_chunks_checkpointed_when_trained_no_grad_when_frozen():
    cfg = WanAnimateConfig.preset("tiny")
    torch.manual_seed(0)
    plain = WanAnimateDiT(cfg).motion_encoder
    chunked = copy.deepcopy(plain)
    faces = torch.rand(9, 3, cfg.motion_encoder_size, cfg.motion_encoder_size) * 2 - 1
    assert chunk_motion_encoder(chunked, 2) == "checkpointed"
    plain.chunk_size = 2
    calls = {"n": 0}
    conv = chunked.enc.net_app.convs[0]
    conv.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    outs = []
    for enc in (plain, chunked):
        out = enc(faces)
        out.pow(2).sum().backward()
        outs.append((out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    assert calls["n"] == 2 * 5  # 5 chunks, forward + recompute
    assert torch.equal(outs[0][0], outs[1][0])
    for n in outs[0][1]:
        assert torch.equal(outs[0][1][n], outs[1][1][n]), n
    # other chunk size: same values up to float reassociation
    other = copy.deepcopy(plain)
    chunk_motion_encoder(other, 4)
    torch.testing.assert_close(other(faces), outs[0][0], rtol=1e-5, atol=1e-6)
    frozen = copy.deepcopy(plain).requires_grad_(False)
    assert chunk_motion_encoder(frozen, 3) == "no_grad"
    out = frozen(faces.requires_grad_(True))
    assert not out.requires_grad
    torch.testing.assert_close(out, outs[0][0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Everything together, 8-bit AdamW, configuration
# ------------------------------------------------------------------------------------------------


def test_all_options_together_equal_fp8_alone():
    ref = lora_model(dtype=torch.bfloat16)
    full = copy.deepcopy(ref)
    apply_memory_options(ref, options(base_dtype="fp8", motion_encoder_chunk=2), device="cpu")
    state = apply_memory_options(full, options(base_dtype="fp8", motion_encoder_chunk=2, block_swap=4,
                                               checkpoint_offload=True), device="cpu")
    assert state.motion_encoder == "checkpointed" and state.block_swap.host_bytes() > 0
    assert_bit_identical(train_steps(ref, steps=2, autocast=True), train_steps(full, steps=2, autocast=True))


@pytest.fixture
def eager_torchao():
    """torchao's AdamW8bit runs its per-parameter step through ``torch.compile``: on a CPU that is an
    inductor C++ build for every parameter shape (31 in the tiny trainer; 20-60 s of CPU on a machine
    without a compile cache, measured), and a GPU builds different (triton) kernels anyway. These
    tests check the optimizer's arithmetic and the trainer around it, so the step runs eagerly
    (PyTorch's ``TORCHDYNAMO_DISABLE`` switch, read when ``torch.compile`` is called): the same
    operations, uncompiled."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        yield


def test_adamw8bit_tracks_adamw(eager_torchao):
    torch.manual_seed(0)
    p8 = nn.Parameter(torch.randn(64, 128))
    p32 = nn.Parameter(p8.detach().clone())
    from train.config import OptimConfig
    from train.modes import make_optimizer

    kw = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01)
    o8 = make_optimizer([{"params": [p8]}], OptimConfig(name="adamw8bit", **kw))
    o32 = make_optimizer([{"params": [p32]}], OptimConfig(name="adamw", **kw))
    start = p32.detach().clone()
    for _ in range(5):
        g = torch.randn(64, 128)
        p8.grad, p32.grad = g.clone(), g.clone()
        o8.step()
        o32.step()
    moved = (p32 - start).norm()
    assert ((p8 - p32).norm() / moved).item() < 0.05
    assert type(o8.state[p8]["exp_avg"]).__name__ == "OptimState8bit"  # 8-bit states really
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        make_optimizer([{"params": [p32]}], OptimConfig(name="sgd", **kw))


@pytest.mark.parametrize("preset", ["animate14b_lora_24gb", "character_lora_24gb"])
def test_24gb_presets_compose_with_every_option(preset):
    from train.config import compose

    paths = ["model.path=/models/Wan2.2-Animate-14B", "data.urls=[/data/x]"]
    cfg = compose([f"experiment={preset}", *paths])
    m = cfg.model
    assert (m.block_swap > 0, m.base_dtype, m.checkpoint_offload, m.motion_encoder_chunk > 0) == \
        (True, "fp8", True, True)
    # same job; animate14b_lora_24gb alone freezes the adapters (trained fully they plan at 23.2 GiB > 22)
    frozen = ["lora.train_adapters=false"] if preset == "animate14b_lora_24gb" else []
    base = compose([f"experiment={preset.removesuffix('_24gb')}", *paths, *frozen])
    assert (cfg.lora, cfg.data, cfg.train.mode) == (base.lora, base.data, base.train.mode)


@pytest.mark.parametrize("overrides, match", [
    (["model.base_dtype=fp16"], "model.base_dtype='fp16'"),
    (["model.checkpoint_dtype=fp8"], "model.checkpoint_dtype='fp8'"),
    (["model.block_swap=-1"], "model.block_swap=-1"),
    (["model.checkpoint_offload=true"], "activation_checkpointing=true"),
    (["model.base_dtype=fp8", "train.mode=full"], "train.mode=full trains them all"),
    (["model.block_swap=2", "train.mode=lora", "model.activation_checkpointing=true", "train.distributed=ddp"],
     "train.distributed=ddp"),
    (["model.block_swap=2", "train.mode=lora", "model.activation_checkpointing=false"],
     "block_swap=2 needs model.activation_checkpointing=true"),
    (["optim.name=lion"], "optim.name='lion'"),
    (["train.grad_accum_on_host=true", "train.distributed=ddp"], "grad_accum_on_host=true keeps one process"),
])
def test_memory_config_errors_name_the_key(overrides, match):
    from train.config import ConfigError, compose

    with pytest.raises(ConfigError, match=match):
        compose(overrides)


# ------------------------------------------------------------------------------------------------
# The real trainer (train.trainer.Trainer, in process) on the quick-start assets
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart_assets(tmp_path_factory):
    (model,), data = make_tiny_assets(tmp_path_factory.mktemp("assets"))
    return model, data


def _trainer_run(assets, out, *overrides, steps=3, then=None):
    from accelerate.state import AcceleratorState, GradientState

    from train.config import compose
    from train.data import resolve_urls
    from train.parallel import make_accelerator
    from train.trainer import Trainer

    model, data = assets
    cfg = compose(["data=shards", f"data.urls=[{data}]", "data.clip_len=9", "data.buckets=[[32,32]]",
                   "data.num_workers=0", "train.micro_batch_size=1", f"train.output_dir={out}",
                   f"model.path={model}", "train.mode=lora", "model.activation_checkpointing=true",
                   "optim.warmup_steps=0", *overrides])
    try:
        trainer = Trainer(cfg, make_accelerator(cfg), Path(model), resolve_urls([str(data)]))
        losses = [trainer.train_step(trainer.next_micro_batches()).loss for _ in range(steps)]
        weights = {n: p.detach().clone() for n, p in trainer.trainable}
        if then is not None:
            then(trainer)
        return losses, weights, trainer.memory
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_trainer_steps_bit_identical_with_block_swap_and_checkpoint_offload(quickstart_assets, tmp_path):
    plain_losses, plain_w, _ = _trainer_run(quickstart_assets, tmp_path / "plain")
    losses, weights, memory = _trainer_run(quickstart_assets, tmp_path / "mem", "model.block_swap=2",
                                           "model.checkpoint_offload=true")
    assert memory.block_swap is not None and memory.block_swap.copies > 0 and memory.checkpoint_store.packed > 0
    assert losses == plain_losses and all(x == x for x in losses)
    assert weights.keys() == plain_w.keys()
    assert all(torch.equal(weights[n], plain_w[n]) for n in weights)


def test_fp8_forward_never_dequantizes_a_weight_to_learn_its_dtype(monkeypatch):
    """The blocks read the compute dtype of their (LoRA-wrapped) fp8 layers without building the
    dequantized weight (FP8Linear.weight is a full bf16 copy)."""
    dit = lora_model(dtype=torch.bfloat16)
    apply_memory_options(dit, options(base_dtype="fp8"), device="cpu")

    def built(self):
        raise AssertionError("FP8Linear.weight dequantized a whole weight")

    monkeypatch.setattr(FP8Linear, "weight", property(built))
    train_steps(dit, steps=1, autocast=True)


def test_trainable_only_checkpoint_never_dequantizes_the_fp8_base(quickstart_assets, tmp_path, monkeypatch):
    """A LoRA checkpoint of an fp8 run saves the trainables only, without dequantizing a single fp8
    layer (accelerate builds the model's state dict before the trainable-only hook filters it)."""
    import wan_animate.memory.fp8 as fp8
    from safetensors import safe_open

    saved = {}

    def save(trainer):
        def refuse(*args):
            raise AssertionError("a checkpoint save dequantized an fp8 layer")

        monkeypatch.setattr(fp8, "dequantize_fp8", refuse)
        saved["path"] = trainer.save_checkpoint(tmp_path / "out")
        saved["trainable"] = {n for n, _ in trainer.trainable}

    _trainer_run(quickstart_assets, tmp_path / "out", "train.precision=bf16", "model.base_dtype=fp8", steps=1,
                 then=save)
    with safe_open(str(saved["path"] / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == saved["trainable"]


def test_gradient_accumulation_on_host_is_bit_identical_and_keeps_no_device_gradient():
    """train.grad_accum_on_host: between micro-batches the running sum lives in host memory (none
    on the device); the gradients of the last micro-batch, hence the update, equal the plain path's."""
    from train.grad_host import HostGradAccumulation

    plain, hosted = lora_model(), lora_model()
    params = [p for p in hosted.parameters() if p.requires_grad]
    acc = HostGradAccumulation(params, torch.device("cpu"))
    for model in (plain, hosted):
        apply_memory_options(model, options(), device="cpu")
    count = 3
    for index in range(count):
        acc.micro_batch(index, count)
        for model in (plain, hosted):
            batch = make_batch(model.config, seed=index)
            loss = flow_matching_loss(model, batch, LossConfig(), generator=torch.Generator().manual_seed(index)).loss
            (loss / count).backward()
        if index < count - 1:
            assert all(p.grad is None for p in params)
    for (name, a), b in zip(((n, p) for n, p in plain.named_parameters() if p.requires_grad), params):
        assert torch.equal(a.grad, b.grad), name
    assert acc.nbytes >= sum(p.numel() * 4 for p in params)


def test_every_option_runs_on_fake_tensors():
    """The memory planner applies these functions on fake tensors: no data-dependent Python."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dit = WanAnimateDiT(WanAnimateConfig.preset("tiny"))
        set_precision(dit, torch.bfloat16)
        for name, p in dit.named_parameters():  # adapters_only: the trunk is frozen
            p.requires_grad_(name.split(".", 1)[0] in ADAPTER_PREFIXES)
        state = apply_memory_options(dit, options(block_swap=3, base_dtype="fp8", checkpoint_offload=True,
                                                  checkpoint_dtype="bf16", motion_encoder_chunk=2), device="cpu")
        batch = make_batch(dit.config)
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = flow_matching_loss(dit, batch).loss
            loss.backward()
    assert state.fp8_layers and state.motion_encoder == "checkpointed"
    assert state.block_swap.copies > 0 and state.host_activation_peak_bytes > 0


def test_trainer_bf16_with_every_option_tracks_the_plain_run(quickstart_assets, tmp_path, eager_torchao):
    plain, _, _ = _trainer_run(quickstart_assets, tmp_path / "plain", "train.precision=bf16")
    losses, _, memory = _trainer_run(
        quickstart_assets, tmp_path / "all", "train.precision=bf16", "model.base_dtype=fp8", "model.block_swap=4",
        "model.checkpoint_offload=true", "model.checkpoint_dtype=bf16", "model.motion_encoder_chunk=2",
        "optim.name=adamw8bit")
    assert memory.summary()["fp8_layers"] > 0 and memory.motion_encoder == "checkpointed"
    assert all(abs(a - b) / b < 0.03 for a, b in zip(losses, plain)), (losses, plain)  # lossy, but close
    assert losses[-1] < losses[0]  # and it trains


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_block_swap_and_offload_on_side_streams_match_the_plain_path():
    """Side-stream copies change no value: with deterministic kernels (math SDPA; deterministic
    algorithms and cuBLAS from conftest) the swapped + offloaded run is bit-identical to the plain
    one. Its host memory is page-locked, exact-size and registered, so CUDA's caching host
    allocator holds none of it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    plain = lora_model().cuda()
    mem = copy.deepcopy(plain).cpu()
    apply_memory_options(plain, options(), device="cuda")
    cached_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    state = apply_memory_options(mem, options(block_swap=3, checkpoint_offload=True), device="cuda")
    swap = state.block_swap
    assert swap.stream is not None and state.checkpoint_store.stream is not None
    assert all(b.pinned for b in swap.buffers.values())
    assert all(p.device.type == "cpu" and p.is_pinned() for s in swap.slots.values() for _, _, p in s)
    assert all(p.device.type == "cuda" for n, p in mem.named_parameters() if p.requires_grad)
    with sdpa_kernel(SDPBackend.MATH):  # deterministic algorithms: tests/conftest.py, for gpu tests
        a, b = train_steps(plain, device="cuda"), train_steps(mem, device="cuda")
    assert_bit_identical(b, a)
    assert swap.misses == 1 and state.checkpoint_store.live_bytes == 0
    assert state.checkpoint_store.held_bytes > 0 and all(b.pinned for b in state.checkpoint_store.pool._idle)
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == cached_before
