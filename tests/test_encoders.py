"""Frozen encoders and the official encoder key maps."""

import pytest
import torch
import torch.nn.functional as F

from wan_animate import official_encoders as oe
from wan_animate.encoders import CLIP_MEAN, CLIP_STD, ImageEncoder, TextEncoder, WanVAE, clean_prompt
from wan_animate.testing import (
    build_tiny_image_encoder,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    build_tiny_vae,
)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    return dict(vae=build_tiny_vae(), tok=tok, t5=build_tiny_text_encoder(32, len(tok)),
                clip=build_tiny_image_encoder(32))


def test_vae_normalisation_and_shapes(parts):
    vae = WanVAE(parts["vae"])
    assert all(not p.requires_grad for p in vae.module.parameters()) and not vae.module.training
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 16, 3, 4, 6)
    with torch.no_grad():
        mu = parts["vae"].encode(video).latent_dist.mode()
    mean = torch.tensor(parts["vae"].config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(parts["vae"].config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (mu - mean) / std)
    torch.testing.assert_close(vae.denormalize(z), mu)
    out = vae.decode(z)
    assert out.shape == (1, 3, 9, 32, 48) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 1, 20, 16))


def test_text_encoder_pads_with_zeros(parts):
    enc = TextEncoder(parts["t5"], parts["tok"], text_len=512)
    prompts = ["a person dancing", "视频中的人在做动作  and   more words here"]
    out = enc.encode(prompts)
    assert out.shape == (2, 512, 32)
    cleaned = [clean_prompt(p) for p in prompts]
    assert cleaned[1] == "视频中的人在做动作 and more words here"
    lens = [len(ids) for ids in parts["tok"](cleaned, add_special_tokens=True)["input_ids"]]
    for i, n in enumerate(lens):
        assert out[i, :n].abs().amax(dim=-1).min() > 0, "real tokens must be encoded"
        assert out[i, n:].abs().max() == 0, "positions past the prompt must be zero"
    # equals the raw encoder on the real tokens (attention masked, so padding does not leak in)
    ids = parts["tok"](prompts[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        raw = parts["t5"](input_ids=ids).last_hidden_state
    torch.testing.assert_close(out[:1, : ids.shape[1]], raw, rtol=1e-4, atol=1e-5)


def test_image_encoder_official_preprocessing(parts):
    enc = ImageEncoder(parts["clip"])
    img = torch.rand(2, 3, 48, 80) * 2 - 1
    out = enc.encode(img)
    assert out.shape == (2, 257, 32)
    # by hand: squash to 224x224 bicubic, [-1,1] -> [0,1], CLIP mean/std, penultimate block
    x = F.interpolate(img, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hs = parts["clip"](pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, hs[-2])
    assert not torch.allclose(out, hs[-1]), "last block output must not be used"
    assert not torch.allclose(out[0], out[1])


# ---------------------------------------------------------------------------------------------
# official key maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vae", "t5", "clip"])
def test_official_round_trip_is_exact(parts, name):
    to_off = {"vae": oe.vae_to_official, "t5": oe.t5_to_official, "clip": oe.clip_to_official}[name]
    from_off = {"vae": oe.vae_from_official, "t5": oe.t5_from_official, "clip": oe.clip_from_official}[name]
    model = parts[name]
    back = from_off(to_off(model))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_official_maps_reject_missing_and_unknown_keys(parts):
    sd = oe.t5_to_official(parts["t5"])
    broken = dict(sd)
    del broken["blocks.1.ffn.gate.0.weight"]
    with pytest.raises(oe.OfficialEncoderError, match="blocks.1.ffn.gate.0.weight"):
        oe.t5_from_official(broken)
    with pytest.raises(oe.OfficialEncoderError, match="unexpected"):
        oe.t5_from_official({**sd, "blocks.0.extra.weight": torch.zeros(1)})
    vsd = oe.vae_to_official(parts["vae"])
    del vsd["decoder.head.2.bias"]
    with pytest.raises(oe.OfficialEncoderError, match="decoder.head.2.bias"):
        oe.vae_from_official(vsd)


def test_full_size_official_layouts_on_meta():
    """The 14B release's encoder shapes: names and sizes inferred back from official-style keys."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        vae = AutoencoderKLWan()
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                num_attention_heads=16, image_size=224, patch_size=14,
                                                hidden_act="gelu"))
    vsd = oe.vae_to_official(vae)
    assert len(vsd) == 194
    assert {"decoder.upsamples.3.resample.1.weight", "decoder.upsamples.4.shortcut.weight",
            "encoder.middle.1.to_qkv.weight", "encoder.head.0.gamma", "conv1.weight"} <= set(vsd)
    assert oe.vae_config_from_official(vsd) == {
        "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
        "temperal_downsample": [False, True, True]}

    tsd = oe.t5_to_official(t5)
    assert tsd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    c = oe.t5_config_from_official(tsd)
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_heads) == (256384, 4096, 64, 10240, 24, 64)

    csd = oe.clip_to_official(clip)
    assert csd["visual.transformer.31.attn.to_qkv.weight"].shape == (3840, 1280)
    assert csd["visual.pos_embedding"].shape == (1, 257, 1280)
    cc = oe.clip_config_from_official(csd)
    assert (cc.hidden_size, cc.num_attention_heads, cc.num_hidden_layers, cc.image_size, cc.patch_size) == (
        1280, 16, 32, 224, 14)


def test_parked_encoder_visits_the_device_without_copying_back():
    """A parked (offload) encoder gets device copies of its weights for one use and drops them: the
    host tensors are never replaced (no copy back, no host allocation per micro-batch). A second
    device kind (meta) stands in for the GPU: copying back from it is impossible."""
    from wan_animate.encoders import _FrozenEncoder

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    enc = _FrozenEncoder(module, dtype=torch.float32, device="meta", offload=True)
    host = [t.data_ptr() for t in (*module.parameters(), *module.buffers())]
    for _ in range(2):
        with enc._on_device() as m:
            assert all(t.device.type == "meta" for t in (*m.parameters(), *m.buffers()))
        assert [t.data_ptr() for t in (*module.parameters(), *module.buffers())] == host
        assert all(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers()))
