"""cache_latents on a tiny random model folder: parity with direct encoding, text dedupe, resume."""


import pytest
import torch

from data_tools.config import CacheLatentsConfig
from wan_animate.samples import decode_cached_sample, decode_sample, load_text_embeds
from data_tools.shards import ShardWriter
from wan_animate.samples import list_shards, read_shard
from data_tools.synthetic_data import make_synthetic_dataset


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


def test_cpu_threads_auto_and_the_cli_wait_policy():
    # The command sets OMP_WAIT_POLICY=PASSIVE before torch loads (spinning OpenMP waits made the
    # tiny model 10-70x slower with 2 threads on a busy machine) and then uses every core; imported
    # after torch (library use) the policy cannot change, so auto is 1 thread.
    import os
    import subprocess
    import sys

    probe = ("import os, data_tools.cache_latents as c; "
             "print(os.environ.get('OMP_WAIT_POLICY'), c.omp_threads_sleep_when_waiting(), c.cpu_threads(0), "
             "c.cpu_threads(3))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cores = len(os.sched_getaffinity(0))
    runs = {  # (code, env) -> expected; started together, each imports torch
        "command": (probe, env, ["PASSIVE", "True", str(cores), "3"]),
        "torch first (negative control)": ("import torch; " + probe, env, ["None", "False", "1", "3"]),
        "user's own policy kept": (probe, dict(env, OMP_WAIT_POLICY="ACTIVE"), ["ACTIVE", "False", "1", "3"]),
    }
    procs = {name: subprocess.Popen([sys.executable, "-c", code], env=e, stdout=subprocess.PIPE, text=True)
             for name, (code, e, _) in runs.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.split() == runs[name][2], (name, out)
    with pytest.raises(ValueError, match="threads=-1"):
        CacheLatentsConfig(input="a", output="b", model="m", threads=-1)


def test_cache_latents_progress_counts_samples_and_restores_threads(tmp_path, tiny_model, capsys):
    from data_tools.cache_latents import cache_latents

    raw = make_synthetic_dataset(tmp_path / "syn", num_clips=3, clip_len=5, height=32, width=32, face_size=16,
                                 shard_size=2)
    before = torch.get_num_threads()
    m = cache_latents(CacheLatentsConfig(input=str(raw), output=str(tmp_path / "c"), model=str(tiny_model),
                                         device="cpu", refert_nums=[0], threads=1), progress=True)
    assert torch.get_num_threads() == before  # the library call leaves torch's setting as it was
    err = capsys.readouterr().err
    assert "3/3" in err and "sample" in err and "samples_per_s=" in err and "shard 2/2" in err, err
    assert "/2 [" not in err  # the bar counts samples, not shards
    assert m["cpu_threads"] == 1 and m["samples_per_s"] > 0 and m["samples_this_run"] == 3


def test_synthetic_generator_is_a_library_module_for_train():
    # The import rule: train/ and eval/ never import a data_tools command module; the quick start's
    # generator lives in data_tools.synthetic_data, the command (python -m data_tools.synthetic)
    # only wraps it. (Here because the cached quick start is built from it.)
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = ("import sys, data_tools.synthetic_data as m; "
             "print(callable(m.make_synthetic_dataset), 'data_tools.synthetic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
    imported = {node.module for path in (root / "train").rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
    assert "data_tools.synthetic_data" in imported and "data_tools.synthetic" not in imported
    import data_tools.synthetic as cli  # the command still re-exports the generator

    assert cli.make_synthetic_dataset is make_synthetic_dataset
