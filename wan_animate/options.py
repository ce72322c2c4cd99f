"""One home for the option vocabularies every app shares: dtypes, devices, frame counts, solvers,
and the one path from a composed Hydra config to an app's validated dataclass.

Every check raises ``ValueError`` whose message names the key, the bad value and the fix, so
config ``__post_init__`` checks and CLIs can show it as a one-line error.
"""

from __future__ import annotations

from typing import Any

SOLVERS = ("unipc", "dpm++", "euler")  # the samplers wan_animate.sampling implements

# canonical short name -> accepted spellings
DTYPE_NAMES = {
    "bf16": ("bf16", "bfloat16"),
    "fp32": ("fp32", "float32", "float"),
    "fp16": ("fp16", "float16", "half"),
}
DTYPE_CHOICES = tuple(s for names in DTYPE_NAMES.values() for s in names)


def canonical_dtype_name(value: Any, key: str = "dtype", *, allow_auto: bool = True) -> str:
    """``"bf16" | "fp32" | "fp16"`` (or ``"auto"``) for any accepted spelling; for config checks
    that must not import torch."""
    text = str(value).strip().lower().removeprefix("torch.")
    if text == "auto" and allow_auto:
        return "auto"
    for canon, names in DTYPE_NAMES.items():
        if text in names:
            return canon
    auto = "auto, " if allow_auto else ""
    raise ValueError(f"{key}={value!r} is not a dtype: use {auto}bf16 (bfloat16), fp32 (float32) or fp16 (float16)")


def parse_dtype(value: Any, device: Any = None, key: str = "dtype"):
    """``torch.dtype`` for a name in either spelling, a ``torch.dtype``, or ``"auto"`` (bfloat16 on
    CUDA ``device``, float32 otherwise: bfloat16 is ~5x slower than float32 on CPUs)."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    canon = canonical_dtype_name(value, key)
    if canon == "auto":
        return torch.bfloat16 if str(device or "cpu").startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[canon]


def resolve_device(name: Any = "auto", key: str = "device"):
    """``torch.device`` for ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda[:N]"``, ..."""
    import torch

    if str(name).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name if isinstance(name, torch.device) else str(name).strip())
    except RuntimeError as e:
        raise ValueError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name} but CUDA is not available here; use {key}=cpu or {key}=auto")
    return dev


def check_frames_4n1(n: int, key: str = "clip_len", *, minimum: int = 1, allow_zero: bool = False) -> int:
    """``n`` if it is 4k+1 and >= ``minimum`` (``allow_zero``: 0 means "all frames"), else ValueError."""
    if allow_zero and n == 0:
        return n
    if not isinstance(n, int) or isinstance(n, bool) or n < minimum or (n - 1) % 4:
        low = max(minimum, 1)
        first = low + (-(low - 1)) % 4
        zero = "0 (all frames) or " if allow_zero else ""
        raise ValueError(f"{key}={n} must be {zero}4n+1 and >= {minimum} ({first}, {first + 4}, ..., 77) so the "
                         f"VAE's 4x temporal stride fits; e.g. {key}={max(first, 4 * ((max(n, 1) - 1) // 4) + 1)}")
    return n


def check_solver(solver: str, key: str = "solver") -> str:
    if solver not in SOLVERS:
        raise ValueError(f"{key}={solver!r} is not one of {SOLVERS}")
    return solver


# No per-run folder, ``.hydra`` copy or log file: the apps write only where their config says.
HYDRA_QUIET = {"output_subdir": None, "run": {"dir": "."}, "job": {"chdir": False}}
HYDRA_VERSION_BASE = "1.3"  # every app's ``@hydra.main`` / ``initialize_config_dir``


def to_dataclass(cfg: Any, cls: type) -> Any:
    """A composed Hydra config (or a plain mapping) -> the validated dataclass ``cls`` (an instance
    is returned as it is). ``OmegaConf.to_object`` against the structured schema: the merge refuses
    unknown keys and wrong types, each nested ``__post_init__`` validates the values."""
    if isinstance(cfg, cls):
        return cfg
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg) and OmegaConf.get_type(cfg) is cls:
        return OmegaConf.to_object(cfg)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg))
