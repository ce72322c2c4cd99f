"""Training Wan-Animate-2 (model.family=animate2) on synthetic triplets: batches (raw == cached, the
long-video condition), gradients through both passes, the modes (LoRA, self-attention only), loss
falls, exact resume, and a LoRA export that moves diffusers' WanAnimate2Transformer3DModel as it
moves our DiT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

CLIPS, FRAMES, SIZE = 4, 9, 32
COMMON = ["model=animate2_tiny", "data=cached", "data.clip_len=9", "data.shuffle_buffer=0", "data.num_workers=0",
          "train.progress=false", "train.validation=false", "train.fixed_noise_per_sample=true",
          "optim.warmup_steps=0", "data.text_dropout=0", "data.replace_prob=0", "data.refert_nums=[1]"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Animate-2 model folder and 4 synthetic triplets cached with its encoders."""
    from data_tools.cache_latents import cache_latents
    from data_tools.config import CacheLatentsConfig
    from data_tools.synthetic_data import make_synthetic_dataset
    from wan_animate.testing import make_tiny_model_folder

    root = tmp_path_factory.mktemp("a2train")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_tiny_model_folder(root / "model", layout="diffusers", family="animate2")
        raw = make_synthetic_dataset(root / "raw", num_clips=CLIPS, clip_len=FRAMES, height=SIZE, width=SIZE,
                                     face_size=32, shard_size=2, driving=True)
        cached = root / "cached"
        cache_latents(CacheLatentsConfig(input=str(raw), output=str(cached), model=str(model), device="cpu",
                                         dtype="fp32", refert_nums=[0, 1]), progress=False)
    finally:
        torch.set_num_threads(n)
    return Path(model), Path(raw), cached


@pytest.fixture(scope="module")
def narrow(assets, tmp_path_factory):
    """The training runs' model: ``tiny_narrow`` (``tiny`` with 32-wide CLIP tokens; official
    layout) and the module's triplets cached with its encoders. At the 1280 width that diffusers'
    class fixes, the image embedding is most of a tiny training step; the tests that compare with
    diffusers' class keep the ``tiny`` diffusers folder."""
    from data_tools.cache_latents import cache_latents
    from data_tools.config import CacheLatentsConfig
    from wan_animate.testing import make_tiny_model_folder

    _, raw, _ = assets
    root = tmp_path_factory.mktemp("a2narrow")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_tiny_model_folder(root / "model", layout="official", family="animate2",
                                       config_preset="tiny_narrow")
        cached = root / "cached"
        cache_latents(CacheLatentsConfig(input=str(raw), output=str(cached), model=str(model), device="cpu",
                                         dtype="fp32", refert_nums=[0, 1]), progress=False)
    finally:
        torch.set_num_threads(n)
    return Path(model), cached


@pytest.fixture
def _fresh(fresh_accelerate_state):
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _run(out, model, cached, *overrides):
    from train.config import compose
    from train.loop import run

    return run(compose([f"train.output_dir={out}", f"model.path={model}", f"data.urls=[{cached}]", *COMMON,
                        *overrides]))


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/train"] for r in sorted(recs, key=lambda r: r["step"]) if "loss/train" in r]


def _examples(raw_dir, cached_dir, num_given):
    """The same sample as a raw and as a cached training example (the whole clip, no dropout)."""
    from wan_animate.samples import decode_cached_sample, decode_sample, list_shards, load_text_embeds, read_shard

    d = decode_sample(read_shard(list_shards(raw_dir)[0])[0])
    embeds, _ = load_text_embeds(cached_dir / "text_embeds.safetensors")
    c = decode_cached_sample(read_shard(list_shards(cached_dir)[0])[0], embeds)
    raw = {"key": d["key"], "video": d["video"], "driving": d["driving"], "ref": d["ref"], "mode": "animate",
           "num_given": num_given, "caption": d["caption"], "noise_seed": 0}
    cached = {"key": c["key"], "cached": True, "latents_target": c["target"], "ref_latent": c["ref"],
              "temporal_latent": c[f"cond_r{num_given}"],
              "num_given": num_given, "mode": "animate", "context": c["text"], "clip_fea": c["clip"],
              "driving_latents": c["driving"], "clip_driving": c["clip_driving"], "text_driving": c["text_driving"],
              "noise_seed": 0}
    return raw, cached


# ------------------------------------------------------------------------------------------------
# batches and the loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~45 s with the module's assets (tiny model, synthetic triplets, cache) and the encoders
def test_raw_and_cached_batches_agree_and_carry_the_previous_segment(assets, narrow):
    """build_inputs of a raw triplet (encoders run) equals that of its cached latents; with
    num_given=1 the condition holds the first frame as the previous segment's tail (mask + latent)."""
    from wan_animate.animate2.batch import build_inputs
    from wan_animate.animate2.pipeline import Animate2Pipeline

    _, raw_dir, _ = assets
    model, cached_dir = narrow

    pipe = Animate2Pipeline.from_pretrained(model, dtype=torch.float32)
    raw, cached = _examples(raw_dir, cached_dir, 1)
    a = build_inputs([raw], pipe, torch.device("cpu"), torch.float32, FRAMES)
    b = build_inputs([cached], None, torch.device("cpu"), torch.float32, FRAMES)
    for k in ("latents", "y", "context", "clip_fea", "driving", "context_ref", "clip_ref"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    y = a["y"]  # [1, 20, T+1, h, w]: mask (4) + latent (16); slot 0 = the reference image
    assert y[:, :4, 0].min() == 1 and y[:, :4, 1].min() == 1  # first target latent frame given ...
    assert y[:, :4, 2:].max() == 0  # ... the rest generated
    first = _examples(raw_dir, cached_dir, 0)[0]
    y0 = build_inputs([first], pipe, torch.device("cpu"), torch.float32, FRAMES)["y"]
    assert y0[:, :4, 1:].max() == 0 and not torch.allclose(y0[:, 4:, 1], y[:, 4:, 1])
    assert not torch.allclose(a["driving"], a["latents"][:, :, 1:])  # the driving stream is not the target
    with pytest.raises(ValueError, match="no replace mode"):
        build_inputs([dict(raw, mode="replace")], pipe, torch.device("cpu"), torch.float32, FRAMES)
    with pytest.raises(ValueError, match="no driving video"):
        build_inputs([{k: v for k, v in raw.items() if k != "driving"}], pipe, torch.device("cpu"), torch.float32,
                     FRAMES)


@pytest.mark.slow  # ~35 s when it builds the module's assets
def test_loss_drops_the_reference_slot_and_gradients_reach_both_streams(assets):
    """The shared flow-matching loss through the family: the reference slot's prediction is not in
    the loss, and one backward reaches the driving stream (its latents and the driving pass)."""
    from wan_animate.animate2.batch import build_inputs, predict
    from wan_animate.animate2.weights import load_animate2
    from wan_animate.objective import LossConfig, flow_matching_loss

    model, raw_dir, cached_dir = assets
    dit = load_animate2(model / "transformer", dtype=torch.float32)
    _, cached = _examples(raw_dir, cached_dir, 1)
    batch = build_inputs([cached], None, torch.device("cpu"), torch.float32, FRAMES)
    batch["driving"].requires_grad_(True)
    t = torch.tensor([700.0])
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    out = flow_matching_loss(dit, batch, LossConfig(), timesteps=t, noise=noise, predict=predict)
    out.loss.backward()
    assert batch["driving"].grad is not None and batch["driving"].grad.abs().sum() > 0
    # the loss equals the MSE over target slots 1..T of the velocity (slot 0 = reference dropped)
    with torch.no_grad():
        x_t = 0.3 * batch["latents"] + 0.7 * noise
        pred = predict(dit, x_t, t, batch)
        want = (pred[:, :, 1:] - (noise - batch["latents"])[:, :, 1:]).pow(2).mean()
        with_ref = (pred - (noise - batch["latents"])).pow(2).mean()
    torch.testing.assert_close(out.loss.detach(), want, atol=1e-5, rtol=1e-5)
    assert abs(with_ref - want) > 1e-4  # the choice matters here


# ------------------------------------------------------------------------------------------------
# training runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~25 s: two 12-step runs of the tiny model on cached triplets
def test_tiny_animate2_learns_and_lr0_does_not(tmp_path, narrow, _fresh):
    model, cached = narrow
    steps = ["train.mode=full", "train.max_steps=12", "train.export=false", "train.checkpoint_every=0"]
    _run(tmp_path / "lr", model, cached, *steps, "optim.lr=2e-3")
    _run(tmp_path / "lr0", model, cached, *steps, "optim.lr=0")
    lr, lr0 = _losses(tmp_path / "lr"), _losses(tmp_path / "lr0")
    assert len(lr) == len(lr0) == 12
    # the same samples and noise draws at every step of both runs (paired): the first step agrees,
    # then only training lowers the loss
    assert lr[0] == pytest.approx(lr0[0], rel=1e-5)
    assert np.mean(lr[-4:]) < 0.7 * np.mean(lr0[-4:]), (lr, lr0)
    assert np.mean(lr[-4:]) < 0.7 * np.mean(lr[:4]), lr


@pytest.mark.slow  # ~50 s: 4 + 2 + 2 steps and exports
def test_self_attn_mode_resumes_exactly_and_trains_only_self_attention(tmp_path, narrow, _fresh):
    from safetensors.torch import load_file

    model, cached = narrow
    args = ["train.mode=self_attn", "optim.lr=1e-3", "train.checkpoint_every=2"]
    _run(tmp_path / "straight", model, cached, *args, "train.max_steps=4")
    _run(tmp_path / "resumed", model, cached, *args, "train.max_steps=2", "train.export=false")
    _run(tmp_path / "resumed", model, cached, *args, "train.max_steps=4")
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert len(a) == len(b) == 4 and a == b  # bit-exact after the resume
    trained = load_file(str(tmp_path / "straight" / "export" / "self_attn.safetensors"))
    assert trained and all(".block.self_attn." in k for k in trained)
    from wan_animate.animate2.weights import load_animate2

    base = load_animate2(model, dtype=torch.float32).state_dict()
    assert set(trained) == {k for k in base if ".block.self_attn." in k}  # q, k, v, o and the q/k norms
    assert any(not torch.equal(trained[k].float(), base[k]) for k in trained)
    ckpt = load_file(str(tmp_path / "straight" / "checkpoints" / "step-4" / "model.safetensors"))
    assert set(ckpt) == set(trained)  # trainable-only checkpoints


@pytest.mark.slow  # ~45 s: a 3-step LoRA run, export, two DiTs
def test_lora_export_moves_diffusers_as_it_moves_ours(tmp_path, assets, _fresh):
    import diffusers.models.transformers.transformer_wan_animate_2 as dm

    from wan_animate.animate2 import driving_condition
    from wan_animate.animate2.weights import load_animate2
    from wan_animate.lora import apply_lora

    model, raw_dir, cached = assets
    out = tmp_path / "lora"
    _run(out, model, cached, "train.mode=lora", "lora=animate2_self_attn", "lora.rank=4", "lora.alpha=2",
         "optim.lr=5e-2", "train.max_steps=3", "train.checkpoint_every=0")
    export = out / "export"
    assert {p.name for p in export.iterdir()} >= {"lora.safetensors", "lora_diffusers.safetensors"}

    ours = load_animate2(model / "transformer", dtype=torch.float32)
    cfg = ours.config
    names = apply_lora(ours, export / "lora.safetensors")
    assert names and all(".block.self_attn." in n for n in names)
    peer = dm.WanAnimate2Transformer3DModel.from_pretrained(model / "transformer", torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    fd, h, w = 2, 4, 4
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = dict(driving=r(1, 16, fd, h, w), context_ref=r(1, cfg.text_len, cfg.text_dim), clip_ref=r(1, 5, 1280),
               x=r(1, 16, fd + 1, h, w), y=r(1, 20, fd + 1, h, w), context=r(1, cfg.text_len, cfg.text_dim),
               clip_fea=r(1, 5, 1280), t=torch.full((1,), 500.0))
    orig = dm.create_block_mask
    dm.create_block_mask = lambda *a, **k: orig(*a, **{**k, "_compile": False})  # eager: the same mask
    try:
        def run_peer():
            grid = torch.tensor([[fd, h // 2, w // 2]])
            cache = dm.WanAnimate2KVCache(cfg.num_layers)
            with torch.no_grad():
                peer([inp["driving"][0]], timestep=inp["t"], encoder_hidden_states=[inp["context_ref"][0]],
                     condition_latents=[driving_condition(inp["driving"])[0]], kv_cache=cache,
                     kv_cache_mode="extract", seq_len=fd * h * w // 4, encoder_hidden_states_image=inp["clip_ref"],
                     offset_grid_sizes=grid)
                return peer([inp["x"][0]], timestep=inp["t"], encoder_hidden_states=[inp["context"][0]],
                            condition_latents=[inp["y"][0]], kv_cache=cache, kv_cache_mode="cached",
                            seq_len=(fd + 1) * h * w // 4, encoder_hidden_states_image=inp["clip_fea"],
                            reference_grid_sizes=grid, origin_len=4 * (fd - 1) + 1,
                            origin_area=[h * 8, w * 8]).sample[0]

        base = run_peer()
        peer.load_lora_adapter(str(export), weight_name="lora_diffusers.safetensors", prefix="transformer")
        moved = run_peer()
    finally:
        dm.create_block_mask = orig
    with torch.no_grad():
        got = ours(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"], inp["driving"],
                   inp["context_ref"], inp["clip_ref"])[0]

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(got, moved) < 1e-5  # diffusers + our exported LoRA == our DiT + the same LoRA
    assert rel(moved, base) > 1e-3  # and the LoRA changed the output


@pytest.mark.parametrize("preset", ["animate2_lora", "animate2_lora_24gb", "animate2_full"])
def test_animate2_presets_compose_and_instantiate(preset, tmp_path):
    """Each Animate-2 preset composes, builds its trainable set on the tiny model and names its budget."""
    from train.config import compose
    from train.modes import make_optimizer, setup_trainable
    from wan_animate.family import get_family

    cfg = compose([f"experiment={preset}", "model.preset=tiny", f"data.urls=[{tmp_path}]", "data.clip_len=9"])
    family = get_family(cfg.model.family)
    assert family.name == "animate2" and cfg.data.replace_prob == 0 and cfg.data.refert_nums == [1]
    assert cfg.data.temporal_ref_prob > 0 and cfg.model.activation_checkpointing  # long-video training
    dit = family.build(family.config(preset=cfg.model.preset)[0])
    groups, summary = setup_trainable(dit, cfg, family)
    make_optimizer(groups, cfg.optim)
    trained = [n for n, p in dit.named_parameters() if p.requires_grad]
    if cfg.train.mode == "lora":
        assert trained and all(".block.self_attn." in n and ".lora_" in n for n in trained)
        assert {n.split(".self_attn.")[1].split(".")[0] for n in trained} == {"q", "k", "v", "o"}
    else:
        assert cfg.train.distributed == "deepspeed" and summary["trainable_params"] == summary["total_params"]
    assert cfg.train.plan_budget_gib == {"animate2_lora": 64, "animate2_lora_24gb": 22, "animate2_full": 70}[preset]
