import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# cuBLAS reads this when it creates its first handle: needed for deterministic CUDA matmuls (gpu tests).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Under pytest-xdist, no more torch threads than cores in all: oversubscribed OpenMP threads wait on
# each other at every op (measured on 2 cores under load: tiny VAE encode 0.05 s with 1 thread, 2.1 s
# with 2). Subprocesses inherit the setting through OMP_NUM_THREADS.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(min(torch.get_num_threads(), _threads))

# The longest test files, longest first (measured on 2 cores), files that start several processes
# alternating with files that run in one. scripts/test.sh runs the suite with
# ``--dist loadfile --no-loadscope-reorder``: each file on one worker, files handed out in collection
# order to whichever worker is free; starting the long ones first keeps one from running alone at the
# end, and the alternation keeps the two workers from launching multi-rank jobs at the same time. Only
# the order changes: every other file follows in pytest's order.
LONGEST_FILES = (
    "test_teach.py", "test_train_sequence_parallel.py", "test_memory_plan.py", "test_train_reliability.py",
    "test_docs_commands.py", "test_train_distributed.py", "test_memory_plan_measured.py", "test_train_state.py",
    "test_data_prepare.py", "test_train_launch.py", "test_teach_animate2.py", "test_animate2_sequence_parallel.py",
    "test_animate2_model.py", "test_train_resume.py", "test_eval_sweep.py", "test_sequence_parallel.py",
    "test_gpu_check.py", "test_train_faults.py", "test_cli_errors.py", "test_eval_cells.py",
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose tiny-model ops are too small for more (the tiny VAE is
    up to ~100x slower with 2 threads on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    stale = [name for name in LONGEST_FILES if not (Path(__file__).parent / name).is_file()]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FILES names files that do not exist: {stale}; "
                                "rename or remove them there")
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# The real sample clip kept in the repo (Wan2.2 examples, Apache-2.0; see its README.md).
WAN_EXAMPLE = Path(__file__).parent / "fixtures" / "wan_examples" / "replace"


@pytest.fixture(autouse=True)
def _deterministic(request):
    """Seeded; the gpu-marked tests compare CUDA runs tightly, so they run deterministic kernels
    (a kernel without a deterministic version warns, naming itself)."""
    torch.manual_seed(0)
    gpu = request.node.get_closest_marker("gpu") is not None
    if gpu:
        torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    if gpu:
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def wan_example() -> Path:
    """The folder holding ``video.mp4`` (driving) and ``image.jpeg`` (reference); a missing file fails the test."""
    for name in ("video.mp4", "image.jpeg"):
        path = WAN_EXAMPLE / name
        assert path.is_file(), f"{path} is missing: the sample clip is part of the repo (git checkout tests/fixtures)"
    return WAN_EXAMPLE


def make_dit_inputs(cfg, batch: int = 2, latent_frames: int = 2, h: int = 4, w: int = 6, *, seed: int = 0,
                    text_tokens: int = 512, image_tokens: int = 257) -> dict[str, torch.Tensor]:
    """Random forward inputs of a ``WanAnimateDiT`` built from ``cfg``: ``latent_frames`` target latent
    frames plus the reference frame, at ``h`` x ``w`` latent pixels (test_dit, test_sequence_parallel)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.motion_encoder_size

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return {  # drawn in this order: the values depend on it
        "x": rand(batch, cfg.out_dim, latent_frames + 1, h, w),
        "t": torch.rand(batch, generator=g) * 1000,
        "context": rand(batch, text_tokens, cfg.text_dim),
        "clip_fea": rand(batch, image_tokens, cfg.image_dim),
        "y": rand(batch, cfg.in_dim - cfg.out_dim, latent_frames + 1, h, w),
        "pose_latents": rand(batch, cfg.latent_channels, latent_frames, h, w),
        "face_pixel_values": torch.rand(batch, 3, 4 * latent_frames - 3, s, s, generator=g) * 2 - 1,
    }


def make_tiny_assets(root: Path, *, num_clips: int = 2, clip_len: int = 9, shard_size: int = 1,
                     model_seeds: tuple[int, ...] = (0,)) -> tuple[list[Path], Path]:
    """The quick start's assets at test size: tiny random model folder(s) (diffusers layout, one per
    seed) and synthetic 32x32 clips with 32-pixel face crops. Returns ([model folders], data folder)."""
    from data_tools.synthetic_data import make_synthetic_dataset
    from wan_animate.testing import make_tiny_model_folder

    models = [Path(make_tiny_model_folder(root / ("model" if s == model_seeds[0] else f"model-seed{s}"),
                                          layout="diffusers", seed=s)) for s in model_seeds]
    data = make_synthetic_dataset(root / "data", num_clips=num_clips, clip_len=clip_len, height=32, width=32,
                                  seed=0, shard_size=shard_size, face_size=32)
    return models, Path(data)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons: reset them after an in-process trainer test."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Wan-Animate-14B model folder (diffusers layout), built once per session."""
    from wan_animate.testing import make_tiny_model_folder

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_model_folder(tmp_path_factory.mktemp("m") / "tiny", layout="diffusers")
    finally:
        torch.set_num_threads(n)


def quick_start_cache(cache: Path, model: Path) -> Path:
    """A ``train.cache_dir`` whose quick-start model is a finished copy of ``model``, the session's
    ``tiny_model`` (the same call the trainer's quick start makes for ``model-tiny-seed0``:
    ``train.assets.build_model``, diffusers layout, seed 0, preset tiny), so the runs started with it
    skip building that folder (~4 s of CPU each); the synthetic data is still written by the first
    run, as the quick start does."""
    import shutil

    from train.assets import asset_paths
    from train.config import compose
    from wan_animate.files import COMPLETE_MARKER

    dst = asset_paths(compose([f"train.cache_dir={cache}"]))[0]
    shutil.copytree(model, dst)
    (dst / COMPLETE_MARKER).write_text("ok")
    return cache


def model_config_folder(root: Path, name: str, config) -> str:
    """A model folder holding only the ``config.json`` of ``config`` (a ``WanAnimateConfig``): what the
    memory planner reads (test_memory_plan, test_memory_plan_measured)."""
    import json

    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_official_config()))
    return str(folder)
