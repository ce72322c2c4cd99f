"""``load_dit``: the DiT built with its parameters on the meta device, then filled shard by shard.

The same scheme serves the official encoders (``wan_animate.official_encoders``): ``empty_model``
then ``load_state_dict(assign=True)``, which puts the file's tensors in without a copy. Names and
shapes are checked from the headers first; peak host memory is about the model plus one shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from wan_animate.config import WanAnimateConfig
from wan_animate.weights import source
from wan_animate.weights.diagnose import SHOW, CheckpointError, check_against_model
from wan_animate.weights.keymap import blur_kernel_keys

M = TypeVar("M", bound=nn.Module)


@contextmanager
def _skip_init_on_meta() -> Iterator[None]:
    # Initialising a meta tensor is meaningless, and some initialisers (normal_) route meta tensors
    # through torch's Python reference kernels, which import torch._dynamo (~3 s). Skip them.
    initialisers = {n: f for n, f in vars(nn.init).items()
                    if n.endswith("_") and not n.startswith("_") and callable(f)}

    def skip_meta(init):
        def wrapped(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)
        return wrapped

    for n, f in initialisers.items():
        setattr(nn.init, n, skip_meta(f))
    try:
        yield
    finally:
        for n, f in initialisers.items():
            setattr(nn.init, n, f)


def empty_model(build: Callable[[], M]) -> M:
    """``build()`` with every parameter on the meta device and real buffers (not thread-safe:
    accelerate patches ``nn.Module.register_parameter`` while it runs)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), _skip_init_on_meta():
        return build()


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Put ``state`` into ``model`` as is (``assign=True``), strictly; fails if anything stays on meta."""
    model.load_state_dict(state, strict=True, assign=True)
    _refuse_meta_leftovers(model, what)
    return model


def _refuse_meta_leftovers(model: nn.Module, what: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: {len(left)} tensors were never filled: {', '.join(left[:SHOW])}",
                              cause="incomplete checkpoint", missing=left)


def build_empty_dit(config: WanAnimateConfig) -> nn.Module:
    """The DiT with parameters on meta and real (computed) buffers such as blur kernels."""
    from wan_animate.model import WanAnimateDiT

    return empty_model(lambda: WanAnimateDiT(config))


def expected_official(config: WanAnimateConfig) -> dict[str, torch.Tensor]:
    """Official names and shapes of the model for ``config``, as meta tensors."""
    return {k: v.to("meta") for k, v in build_empty_dit(config).state_dict(keep_vars=True).items()}


def progress_bar(enabled: bool, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def load_dit(
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: WanAnimateConfig | None = None,
    *,
    progress: bool | None = None,
) -> nn.Module:
    """Load a ``WanAnimateDiT`` from an official folder, a diffusers folder or a single file.

    ``dtype=None`` keeps the dtypes stored in the file; otherwise every tensor is cast as it is
    filled in, by the rule of ``set_precision(model, dtype)`` (the fp32-by-design tables stay
    fp32), so a fp32 file never sits whole in memory before a bf16 cast. On the CPU, tensors that
    need no cast stay memory-mapped from the file (copy-on-write) until written or moved.
    ``progress=None`` shows a bar for checkpoints over 1 GB. The model is returned in eval mode.
    """
    device = torch.device(device)
    src = source.open_source(path)
    config, config_source = source.identify(src, config)
    model = build_empty_dit(config)
    check_against_model(source.virtual_official(src, config), model.state_dict(keep_vars=True), config,
                        where=str(path), layout=src.layout, config_source=config_source,
                        optional=set(blur_kernel_keys(config)), src=src)

    return fill_model(model, source.stream_official(src, config, device), device=device, dtype=dtype,
                      total_bytes=src.total_bytes, what=str(path), progress=progress)


def fill_model(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device,
               dtype: torch.dtype | None, total_bytes: int, what: str, progress: bool | None) -> nn.Module:
    """Fill a meta-device model (names and shapes already checked) with ``batches`` of official-named
    tensors, one shard each, cast as they arrive by the rule of ``set_precision(model, dtype)``
    (``None``: stored dtypes); buffers the file lacks (computed by the skeleton) go to ``device``.
    Refuses a half model; returns it in eval mode. Every family's loader ends here."""
    import wan_animate.model as model_module

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if dtype is None or not tensor.is_floating_point():
            return tensor
        want = torch.float32 if model_module.is_fp32_by_design(name) else dtype
        return tensor if tensor.dtype == want else tensor.to(want)

    show = total_bytes > 1e9 if progress is None else progress
    bar = progress_bar(show, total=total_bytes, desc=f"load {Path(what).name}")
    for batch in batches:
        bar.update(sum(t.numel() * t.element_size() for t in batch.values()))
        model.load_state_dict({k: cast(k, v) for k, v in batch.items()}, strict=False, assign=True)
        del batch  # the shard's tensors now live in the model only
    bar.close()
    for name, buf in list(model.named_buffers()):
        if buf.device != device and not buf.is_meta:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = buf.to(device)
    _refuse_meta_leftovers(model, what)  # never hand out a half model
    if dtype is not None:
        model_module.set_precision(model, dtype)  # buffers computed by the skeleton
    return model.eval()
