"""Memory planner: one real training step at full size on fake tensors, with the peak by category.

    accelerate launch train/main.py experiment=animate14b_lora train.dry_run=memory [overrides]
    plan_memory(cfg) -> dict   (the same, in process)

It builds what the trainer builds, with the trainer's own functions (``train.modes.prepare_model``,
``make_optimizer``), from the preset or the model folder's ``config.json`` (no weight read, nothing
downloaded), plus the frozen encoders at their real sizes placed as ``train/frozen_encoders.py``
places them. Then it runs one step in its steady state (optimizer states and kept accumulated
gradients present): batch building, forward under autocast, loss, backward, clipping, step,
zero_grad, all under ``FakeTensorMode`` on the CPU while ``LiveBytes`` counts live storages.

Parallel engines (``train.plan_world_size=N`` plans one rank of N):
* DDP: every rank holds the whole model, gradients and optimizer states, plus DDP's gradient
  buckets (one more copy of the gradients; ``gradient_as_bucket_view`` is off by default).
* ZeRO-2 (DeepSpeed, bf16): parameters whole; gradients kept as a 1/N fp32 partition plus one
  reduce bucket (``reduce_bucket_size`` elements, bf16); optimizer = fp32 master + Adam m, v
  (12 bytes per trainable parameter) / N.
* ZeRO-3: as ZeRO-2, and the parameters too are 1/N; during forward/backward the gathered working
  set is live in addition: the two largest DiT blocks in bf16 (the one computing + the prefetched
  one), bounded by ``stage3_max_live_parameters``. Parameters below
  ``stage3_param_persistence_threshold`` elements are counted whole (never partitioned).
* At the DeepSpeed step: the fp32 gradient of one optimizer sub-group (``sub_group_size``
  elements at most) and its bf16 flattened source, alive during the step only (allocated by the
  planned step at that size).
Those optimizer/gradient/working-set figures are *computed* (``train.plan.engines``) from
the parameter counts and launch/deepspeed/*.json; everything else is *measured* on the fake step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from train.assets import build_model
from train.config import Config, ConfigError
from train.modes import make_optimizer, prepare_model
from train.plan.animate2 import planned_incontext
from train.plan.encoders import build_meta_encoders, text_width, wrap_encoders
from train.plan.engines import engine_of, parallel_terms
from train.plan.report import candidate_options, format_plan, plan_result, with_overrides
from train.plan.sequence import install_planned as install_planned_sequence_parallel
from train.plan.track import LiveBytes
from train.preflight import latent_geometry
from wan_animate.family import DEFAULT_FAMILY, get_family
from wan_animate.memory.pinned import aligned
from wan_animate.objective import flow_matching_loss

DEFAULT_BUCKET = (480, 832)  # H, W planned when the data config names no bucket


# ---------------------------------------------------------------------------- what is planned


def model_folder(cfg: Config) -> str | None:
    """The folder whose ``config.json`` files describe the model: ``model.path``, or for a preset
    other than 14b the quick-start tiny folder training would write (written here if missing)."""
    if cfg.model.path or cfg.model.preset == "14b" or cfg.model.family != DEFAULT_FAMILY:
        return cfg.model.path
    return str(build_model(cfg))


def planned_shape(cfg: Config) -> tuple[int, int]:
    """(H, W) of the planned clip: the largest bucket (the worst case), else the synthetic size."""
    d = cfg.data
    if d.buckets:
        return tuple(max(d.buckets, key=lambda b: b[0] * b[1]))  # type: ignore[return-value]
    if d.source == "synthetic":
        return d.synthetic_height, d.synthetic_width
    return DEFAULT_BUCKET


# ---------------------------------------------------------------------------- the fake step


def account_memory_options(state, tracker: LiveBytes) -> dict[str, Any]:
    """Tell ``tracker`` which storages the applied memory options (``wan_animate.memory``) keep on
    the host; returns their summary."""
    if state.block_swap is not None:  # the swapped frozen weights stay in (pinned) host memory
        tracker.track([p for slots in state.block_swap.slots.values() for _, _, p in slots], "frozen_weights",
                      host=True)
    if state.checkpoint_store is not None and state.checkpoint_store.offload:
        _account_offload(state.checkpoint_store, tracker)
    return state.summary()


def _account_offload(store, tracker: LiveBytes) -> None:
    """Checkpoint offload on the planner's CPU: the packed copies are host memory, and the copy
    back for the recomputation is a new device tensor (on the CPU ``.to(cpu)`` would alias)."""
    pack, unpack = store.pack, store.unpack

    def planned_pack(t, min_numel):
        packed = pack(t, min_numel)
        stored = getattr(packed, "stored", None)
        if stored is not None:
            tracker.track([stored], "activations", host=True)
        return packed

    def planned_unpack(packed):
        out = unpack(packed)
        stored = getattr(packed, "stored", None)
        if stored is not None and out.untyped_storage() is stored.untyped_storage():
            out = out.clone()
        return out

    store.pack, store.unpack = planned_pack, planned_unpack


def _examples(cfg: Config, mcfg, shape: tuple[int, int]) -> list[dict[str, Any]]:
    """One micro-batch of examples at the planned shape, with the family's driving streams as the
    data recipe (``train.data``) gives them (fake tensors; values never matter)."""
    h, w = shape
    n = cfg.data.clip_len
    t_lat = (n - 1) // 4 + 1
    lh, lw = h // 8, w // 8
    sides = get_family(cfg.model.family).stream_sizes(mcfg)
    cached = cfg.data.source == "cached"
    out = []
    for i in range(cfg.train.micro_batch_size):
        e: dict[str, Any] = {"num_given": max(cfg.data.refert_nums), "mode": "animate", "noise_seed": i,
                             "key": f"plan-{i}"}
        for stream, side in sides.items():
            if stream == "face":  # pixels in both kinds of shards
                face = cfg.data.face_size or side
                e["face"] = torch.empty(3, n, face, face)
            elif cached:
                e[f"{stream}_latents"] = torch.empty(16, t_lat, lh, lw)
            else:
                e[stream] = torch.empty(3, n, h, w) if side is None else torch.empty(3, n, side, side)
        image_tokens = getattr(mcfg, "num_image_tokens", 257)  # Animate-2's config has no field: CLIP ViT-H/14's 257
        if cached:
            e.update(cached=True, ref_latent=torch.empty(16, 1, lh, lw), temporal_latent=torch.empty(16, t_lat, lh, lw),
                     latents_target=torch.empty(16, t_lat, lh, lw), context=torch.empty(mcfg.text_len, mcfg.text_dim),
                     clip_fea=torch.empty(image_tokens, mcfg.image_dim))
            if "driving" in sides:  # the driving pass's cached CLIP tokens and prompt embedding
                e.update(clip_driving=torch.empty(image_tokens, mcfg.image_dim),
                         text_driving=torch.empty(mcfg.text_len, mcfg.text_dim))
        else:
            e.update(video=torch.empty(3, n, h, w), ref=torch.empty(3, h, w), caption="plan")
        out.append(e)
    return out


def _to_empty(module: torch.nn.Module) -> None:
    """``module.to_empty(device="cpu")``, each tensor allocated from its size and strides (what
    ``to_empty``'s ``empty_like`` gives): under the fake mode a meta input takes the slow path, a
    plain allocation the dispatch cache."""
    module._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu"))


def _to_empty_keeping_ties(module: torch.nn.Module) -> None:
    """``to_empty`` that keeps shared parameters shared (umT5's token embedding is one tensor under
    two names; under the fake mode ``to_empty`` would give each name its own copy)."""
    from accelerate.utils import find_tied_parameters, retie_parameters

    tied = find_tied_parameters(module)
    _to_empty(module)
    retie_parameters(module, tied)


def fill_sane(tensors: list[torch.Tensor], std: float = 0.02) -> None:
    """Write finite, weight-like values (std ``std``) into every element of ``tensors``: one block of
    normal samples tiled over each tensor, a copy per tensor instead of a random draw per element
    (the planner's real-tensor check only needs every page touched and the step's numbers sane). The
    block's prime length keeps a weight's rows from repeating it in step."""
    block = torch.empty(_FILL_BLOCK).normal_(0.0, std, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in tensors:
            flat, n = t.view(-1), t.numel()
            rows = n // _FILL_BLOCK
            if rows:
                flat[: rows * _FILL_BLOCK].view(rows, _FILL_BLOCK).copy_(block.expand(rows, _FILL_BLOCK))
            flat[rows * _FILL_BLOCK:].copy_(block[: n - rows * _FILL_BLOCK])


_FILL_BLOCK = 1_000_003  # elements (prime), 4 MB: cache-resident while it is copied


def _build(cfg: Config, mcfg, tracker, use_ds: bool, meta: tuple, init: bool = False) -> dict[str, Any]:
    """DiT + trainable set + options + optimizer + encoders, as fake tensors; categories marked.
    ``meta`` = (DiT, encoders) built on meta *outside* ``FakeTensorMode`` (a module the fake mode has
    seen cannot be swapped by ``to_empty``); call inside the mode."""
    family = get_family(cfg.model.family)
    # the trainer's dtypes: the DiT and umT5/CLIP in bf16 on a bf16 run, the VAE in fp32
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    dit, (modules, sources) = meta
    _to_empty(dit)
    if init:  # a real-tensor run: touch every weight (untouched pages would not count) with sane values
        fill_sane([*dit.parameters(), *dit.buffers()])
    family.set_precision(dit, dtype)  # what loading the weights does
    # cached shards: the encoders only serve validation, parked on the host (the trainer's offload):
    # counted from their sizes, never run, so not materialised either
    offload = cfg.data.source == "cached"
    enc = SimpleNamespace() if modules else None
    if modules and offload:
        tracker.host["frozen_encoders"] += sum(
            p.numel() * (4 if name == "vae" else dtype.itemsize) for name, m in modules.items() for p in m.parameters())
        modules_on_device = {}
    else:
        for m in modules.values():
            _to_empty_keeping_ties(m)
        if modules:
            enc = wrap_encoders(modules, text_len=mcfg.text_len, encoder_dtype=dtype, vae_dtype=torch.float32,
                                offload=False)
        modules_on_device = modules
    with tracker:
        torch.manual_seed(cfg.train.seed)
        groups, summary, state = prepare_model(dit, cfg, family, deepspeed=use_ds, device="cpu")
        options = account_memory_options(state, tracker)
        optimizer = make_optimizer(groups, cfg.optim)
        for p in dit.parameters():
            tracker.track([p], "trainable_weights" if p.requires_grad else "frozen_weights")
        tracker.track(list(dit.buffers()), "frozen_weights")
        # raw shards: parked on the host too, on the device only to encode (train/frozen_encoders.py, _step)
        enc_tensors = [t for m in modules_on_device.values() for t in (*m.parameters(), *m.buffers())]
        tracker.track(enc_tensors, "frozen_encoders", host=True)
    if enc is not None:
        enc.sources = sources
        enc.tensors = enc_tensors
        enc.params = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    return {"dit": dit, "optimizer": optimizer, "summary": summary, "options": options, "encoders": enc,
            "use_ds": use_ds, "init": init, "notes": {}}


def _step(cfg: Config, built: dict[str, Any], mcfg, shape, tracker: LiveBytes) -> None:
    """One optimizer step in its steady state: optimizer states present, the gradients kept over
    the accumulation present (grad_accum > 1), one micro-batch (batch building, forward, loss,
    backward), clipping, step, zero_grad."""
    family = get_family(cfg.model.family)

    dit, optimizer = built["dit"], built["optimizer"]
    trainable = [p for p in dit.parameters() if p.requires_grad]
    for p in trainable:
        p.register_post_accumulate_grad_hook(lambda p: tracker.track([p.grad], "gradients"))
    bf16 = cfg.train.precision == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    input_dtype = torch.bfloat16 if built["use_ds"] else torch.float32
    # Steady state (step 2 onwards): the optimizer states exist before the step starts. One step on
    # zero gradients creates them the way the optimizer does (lazily, at its first step).
    tracker.phase = "optimizer"
    if type(optimizer).__module__.startswith("torchao"):
        # torchao's 8-bit AdamW quantises with data-dependent ops that fake tensors cannot run: its
        # states are computed (int8 exp_avg and exp_avg_sq + one fp32 scale per 256-value block each).
        n = sum(p.numel() for p in trainable)
        tracker.extra["optimizer_states"] = n * 2 * (1 + 4 / 256)
        built["notes"]["optimizer_states"] = "computed: torchao AdamW8bit, 2 x (1 B + 4 B / 256) per trainable param"
        optimizer = _NO_STEP
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in trainable:  # zero_grad(set_to_none=True), also where the optimizer is a computed stand-in
        p.grad = None
    if cfg.train.grad_accum > 1 and cfg.train.grad_accum_on_host:
        # train/grad_host.py: the running sum waits in pinned host memory (fp32, exact-size); the
        # device holds gradients only in the last backward, as at grad_accum=1 (planned below)
        tracker.host["gradients"] += sum(aligned(p.numel() * 4) for p in trainable)
        tracker._update_peak()
    elif cfg.train.grad_accum > 1:
        # Micro-batches 2..N start with the gradients kept from the previous ones: one such
        # micro-batch is the worst case of the accumulation (backward adds into them in place).
        for p in trainable:
            p.grad = torch.zeros_like(p)
            tracker.track([p.grad], "gradients")
    tracker.phase = "encode"
    examples = _examples(cfg, mcfg, shape)
    if built["init"]:
        for t in (t for e in examples for t in e.values() if isinstance(t, torch.Tensor)):
            t.uniform_(-1.0, 1.0)
    tracker.track([t for e in examples for t in e.values() if isinstance(t, torch.Tensor)], "inputs")
    on_device = getattr(built["encoders"], "tensors", []) if cfg.model.encoders_device == "device" else []
    tracker.track(on_device, "frozen_encoders", host=False)  # moved in to encode this batch ...
    # model.encoders_device=cpu (raw shards): the encode and its activations are host memory
    tracker.new_on_host = built["encoders"] is not None and cfg.model.encoders_device == "cpu"
    batch = family.build_inputs(examples, built["encoders"], torch.device("cpu"), input_dtype, cfg.data.clip_len)
    tracker.new_on_host = False
    tracker.track(on_device, "frozen_encoders", host=True)  # ... and parked again before the DiT step
    tracker.track([v for v in batch.values() if isinstance(v, torch.Tensor)], "inputs", host=False)
    del examples
    tracker.phase = "forward"
    with autocast:
        out = flow_matching_loss(dit, batch, cfg.loss, generator=None, predict=family.predict)
    tracker.phase = "backward"
    out.loss.backward()
    del out, batch
    tracker.phase = "optimizer"
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
    step_grad = built["notes"].get("ds_step_grad_elements", 0)
    if step_grad:  # DeepSpeed's per-sub-group fp32 gradient copy, alive only during the step
        flat = torch.empty(step_grad, dtype=input_dtype)
        fp32_grad = flat.float()
        tracker.track([flat, fp32_grad], "temporaries")
        del flat, fp32_grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker.phase = "done"


# ---------------------------------------------------------------------------- plan


def plan_memory(cfg: Config, *, world_size: int | None = None, suggest: bool = False,
                write: bool = True, quiet: bool = True) -> dict[str, Any]:
    """Plan one rank of ``cfg``'s training step; see the module docstring. Returns the plan dict
    (also written to ``<train.output_dir>/memory_plan.json`` when ``write``)."""
    t0 = time.time()
    world = world_size or cfg.train.plan_world_size or int(os.environ.get("WORLD_SIZE", "1"))
    engine, stage = engine_of(cfg, world)
    family, folder = get_family(cfg.model.family), model_folder(cfg)
    mcfg, model_source = family.config(preset=cfg.model.preset, folder=folder)
    shape = planned_shape(cfg)
    (_, t_lat, h, w), tokens = latent_geometry(cfg.data.clip_len, shape, mcfg)  # t_lat: + the reference slot
    if "driving" in family.streams:  # Animate-2: + the driving stream (no reference slot)
        pt, ph, pw = mcfg.patch_size
        tokens += (t_lat - 1) // pt * (h // ph) * (w // pw)
    width, width_source = text_width(folder)  # checked before anything is built
    if cfg.data.source != "cached" and width != mcfg.text_dim:  # the encoders run in the planned step
        raise ConfigError(f"model.preset={cfg.model.preset}: the DiT reads {mcfg.text_dim}-wide text embeddings, but "
                          f"umT5 sized from {width_source} is {width} wide; set model.path to a "
                          "model folder (its text_encoder/config.json is read) or plan cached shards (data=cached).")
    tracker = LiveBytes()
    with torch.device("meta"):
        meta = (family.build(mcfg), build_meta_encoders(folder))
    with FakeTensorMode(allow_non_fake_inputs=True), fake_module_conversion():
        built = _build(cfg, mcfg, tracker, use_ds=engine == "deepspeed", meta=meta)
        install_planned_sequence_parallel(built["dit"], cfg, world)  # train.sequence_parallel > 1 only
        del meta
        scale, extra, notes = parallel_terms(cfg, built["dit"], world, engine, stage)
        _rescale(tracker, scale, extra)
        t_build = time.time() - t0
        if engine == "deepspeed":  # DeepSpeed's own optimizer; its states are the computed terms
            built["optimizer"] = _NO_STEP
        built["notes"] = notes
        # Animate-2: the in-context attention planned as its GPU kernel allocates (``train.plan.animate2``)
        with tracker, planned_incontext() if family.name == "animate2" else contextlib.nullcontext():
            _step(cfg, built, mcfg, shape, tracker)
        summary, options, enc = built["summary"], built["options"], built["encoders"]
        del built
    plan = plan_result(cfg, tracker, world=world, engine=engine, stage=stage, tokens=tokens, shape=shape,
                   model_source=model_source, summary=summary, options=options, enc=enc, notes=notes,
                   seconds={"build": round(t_build, 1), "total": round(time.time() - t0, 1)})
    sp = cfg.train.sequence_parallel
    plan.update(sequence_parallel=sp, tokens_per_rank=math.ceil(tokens / sp))
    if suggest and not plan["fits_device"]:  # the options tried lower device memory, not host RAM
        plan["options_tried"] = try_options(cfg, world)
    if write:
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory_plan.json").write_text(json.dumps(plan, indent=1, allow_nan=False))
    if not quiet:
        print(format_plan(plan), flush=True)
    return plan


class NullTracker(contextlib.nullcontext):
    """Stands in for ``LiveBytes`` when the same step runs on real tensors (measured elsewhere)."""

    phase = "setup"

    def track(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def fake_module_conversion():
    """Let ``Module.to()`` convert fake parameters (peft moves its LoRA layers, encoder wrappers cast).

    ``Module._apply`` always swaps fake parameters with ``torch.utils.swap_tensors``, which refuses
    tensors with a weak reference, and fake-mode parameters carry one. Within this context a fake
    parameter gets the converted data by ``.data =`` instead (what ``_apply`` does for real ones)."""
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        if isinstance(t1, FakeTensor):
            t1.data = t2  # the converted tensor itself (``t2.data`` would be one more detach)
            return
        original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


# the optimizer whose states are computed terms (DeepSpeed's, torchao's 8-bit AdamW)
_NO_STEP = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None)


def _rescale(tracker: LiveBytes, scale: dict, extra: dict) -> None:
    """Apply a parallel model's scale to what is already counted, and its constant extras."""
    for cat, s in scale.items():
        tracker.device[cat] *= s
    tracker.scale.update(scale)
    tracker.extra.update(extra)
    tracker.peak = 0.0
    tracker._update_peak()


# ---------------------------------------------------------------------------- options that fit


def try_options(cfg: Config, world: int) -> list[dict[str, Any]]:
    out = []
    for overrides in candidate_options(cfg):
        plan = plan_memory(with_overrides(cfg, overrides), world_size=world, write=False)
        out.append({"overrides": overrides, "peak_device_gib": plan["peak_device_gib"], "fits": plan["fits"]})
    return out
