"""cache_latents on a tiny random model folder: parity with direct encoding, text dedupe, resume."""


import pytest
import torch

from data_tools.config import CacheLatentsConfig
from data_tools.dataset import decode_cached_sample, decode_sample, load_text_embeds
from data_tools.shards import ShardWriter, list_shards, read_shard
from data_tools.synthetic import make_synthetic_dataset


@pytest.fixture
def one_thread():
    # The tiny VAE is ~100x slower with 2 intra-op threads on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from wan_animate.testing import make_tiny_model_folder

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_model_folder(tmp_path_factory.mktemp("m") / "tiny", layout="diffusers")
    finally:
        torch.set_num_threads(n)


def _raw_set(tmp_path):
    src = make_synthetic_dataset(tmp_path / "syn", num_clips=3, clip_len=9, height=32, width=32, face_size=32,
                                 shard_size=2, replace=True)
    # give one sample its own caption so deduplication has something to do
    out = tmp_path / "raw"
    with ShardWriter(out, shard_size=2) as w:
        for i, raw in enumerate(s for p in list_shards(src) for s in read_shard(p)):
            if i == 1:
                raw = dict(raw, txt="a person waves".encode())
            if i == 2:  # uncaptioned: must train on the default prompt, not on the dropout prompt ""
                raw = dict(raw, txt=b"")
            w.write(raw)
    return out


def test_cache_latents_parity_dedupe_and_resume(tmp_path, tiny_model, one_thread):
    from data_tools.cache_latents import cache_latents, load_encoders, text_key

    raw_dir = _raw_set(tmp_path)
    out = tmp_path / "cached"
    cfg = CacheLatentsConfig(input=str(raw_dir), output=str(out), model=str(tiny_model), device="cpu",
                             dtype="fp32", refert_nums=[0, 1])
    m = cache_latents(cfg, progress=False)
    assert m["samples_this_run"] == 3 and len(m["shards"]) == 2 and not m["skipped_samples"]

    embeds, captions = load_text_embeds(out / "text_embeds.safetensors")
    assert sorted(captions.values()) == sorted(["", "a person waves", "视频中的人在做动作"])  # deduplicated
    import json

    metas = [json.loads(s["json"]) for p in list_shards(out) for s in read_shard(p)]
    assert [m_["text_key"] == text_key("视频中的人在做动作") for m_ in metas].count(True) == 2
    vae, text_enc, image_enc = load_encoders(tiny_model, device="cpu", compute_dtype=torch.float32)
    raw0 = read_shard(list_shards(raw_dir)[0])[0]
    d = decode_sample(raw0)
    c = decode_cached_sample(read_shard(list_shards(out)[0])[0], embeds)
    assert c["key"] == d["key"] and c["meta"]["text_key"] == text_key(d["caption"])
    # parity with encoding directly
    torch.testing.assert_close(c["target"], vae.encode(d["video"][None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["pose"], vae.encode(d["pose"][None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["ref"], vae.encode(d["ref"][None, :, None])[0], atol=1e-5, rtol=1e-5)
    given = torch.cat([d["video"][:, :1], torch.zeros_like(d["video"][:, 1:])], 1)
    torch.testing.assert_close(c["cond_r1"], vae.encode(given[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["cond_r0"], vae.encode(torch.zeros_like(d["video"])[None])[0], atol=1e-5, rtol=1e-5)
    replace = torch.cat([d["video"][:, :1], d["bg"][:, 1:]], 1)
    torch.testing.assert_close(c["cond_replace_r1"], vae.encode(replace[None])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(c["cond_r1"], c["cond_replace_r1"])  # the background matters
    torch.testing.assert_close(c["clip"], image_enc.encode(d["ref"][None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["text"], text_enc.encode([d["caption"]])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["text_empty"], text_enc.encode([""])[0], atol=1e-5, rtol=1e-5)
    t_lat, h, w = c["target"].shape[1:]
    assert c["char_mask"].shape == (1, 9, h, w) and set(c["char_mask"].unique().tolist()) <= {0.0, 1.0}
    assert c["face"].shape == d["face"].shape
    assert c["meta"]["latent_shape"] == [16, t_lat, h, w]

    # resume: a finished shard is kept untouched, a missing one is redone
    first, second = list_shards(out)
    stamp = first.stat().st_mtime_ns
    second.unlink()
    (out / "shard-000001.tar.tmp").write_bytes(b"partial")
    m2 = cache_latents(cfg, progress=False)
    assert m2["samples_this_run"] == 1 and first.stat().st_mtime_ns == stamp
    assert not list(out.glob("*.tmp")) and len(list_shards(out)) == 2


def test_cache_latents_bf16_default_and_errors(tmp_path, tiny_model, one_thread):
    from data_tools.cache_latents import cache_latents

    raw = make_synthetic_dataset(tmp_path / "syn", num_clips=1, clip_len=5, height=32, width=32, face_size=16)
    out = tmp_path / "c"
    cache_latents(CacheLatentsConfig(input=str(raw), output=str(out), model=str(tiny_model), device="cpu",
                                     refert_nums=[0]), progress=False)
    embeds, _ = load_text_embeds(out / "text_embeds.safetensors")
    c = decode_cached_sample(read_shard(list_shards(out)[0])[0], embeds)
    assert c["target"].dtype == torch.bfloat16 and c["text"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model=MODEL_DIR"):
        CacheLatentsConfig(input="a", output="b")
    with pytest.raises(SystemExit, match="no shard"):
        cache_latents(CacheLatentsConfig(input=str(tmp_path), output=str(out), model=str(tiny_model)), progress=False)
