"""Helper process of tests/test_train_reliability.py: the real Trainer under DeepSpeed ZeRO-2 on CPU
(one process) with a non-finite gradient injected at optimizer step 2.

    python tests/_ds_nonfinite.py CACHE PRECISION PORT PHASE=OUT [PHASE=OUT ...]

PHASE ``straight``: steps 1..5, a checkpoint after step 3; prints JSON with per-step loss, skipped
flag and whether the trainable weights changed. PHASE ``resume``: resumes from that checkpoint and
runs steps 4..5. PHASE ``unchecked`` (bf16): ``straight`` with DeepSpeed's overflow check switched
off, the configuration the trainer refuses. The poison scales the gradient by inf in backward and leaves the loss finite, so
only the gradient path can skip the update. Several phases run one after the other in this process, each
with its own Accelerator and Trainer (one ``RESULT`` line each); a resume runs in a process of its own
(the test's), so that nothing but the checkpoint carries over.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
cache, precision, port = sys.argv[1:4]
PHASES = [arg.split("=", 1) for arg in sys.argv[4:]]
os.environ.update(
    ACCELERATE_USE_DEEPSPEED="true", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0",
    WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", WANDB_MODE="offline",
)
# ZeRO-2 on CPU; bf16 from train.precision (the shipped CPU JSON pins bf16 off)
ds_json = Path(PHASES[0][1]).parent / f"zero2-{precision}.json"
ds_json.write_text(json.dumps({**json.loads((ROOT / "launch/deepspeed/zero2_cpu.json").read_text()), "bf16": {"enabled": "auto"}}))
os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds_json)

import torch  # noqa: E402

import train.trainer as trainer_module  # noqa: E402
from train.assets import prepare_assets  # noqa: E402
from train.config import compose  # noqa: E402
from train.parallel import make_accelerator  # noqa: E402
from train.trainer import Trainer  # noqa: E402

POISONED_STEP = 2


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def run_phase(phase: str, out: str) -> dict:
    cfg = compose([f"train.output_dir={out}", f"train.cache_dir={cache}", f"train.precision={precision}",
                   "train.progress=false", "train.validation=false", "train.export=false", "train.max_steps=5",
                   "train.checkpoint_every=0", "optim.warmup_steps=0"])
    if precision == "bf16":  # make_accelerator refuses bf16 DeepSpeed on CPU (slow, unsupported for training)
        from accelerate import Accelerator

        from train.parallel import _fill_deepspeed_config
        from wan_animate.parallel import skip_deepspeed_shm_op

        skip_deepspeed_shm_op()  # as make_accelerator does
        acc = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=cfg.train.grad_accum)
        _fill_deepspeed_config(acc, cfg)
        if phase == "unchecked":  # negative control: what the trainer refuses (DeepSpeed's check off)
            acc.state.deepspeed_plugin.deepspeed_config["bf16"]["check_grad_overflow"] = False
    else:
        acc = make_accelerator(cfg)
    model_path, urls = prepare_assets(cfg, acc)
    trainer = Trainer(cfg, acc, model_path, urls)
    plain_loss = trainer_module.flow_matching_loss

    def poisoned_loss(*args, **kwargs):
        result = plain_loss(*args, **kwargs)
        if trainer.state.step + 1 == POISONED_STEP:
            result.loss = _InfGrad.apply(result.loss)
        return result

    trainer_module.flow_matching_loss = poisoned_loss
    try:
        record = train_steps(trainer, phase, out)
    finally:
        trainer_module.flow_matching_loss = plain_loss
    return record


def train_steps(trainer: Trainer, phase: str, out: str) -> dict:
    record = {"loss": [], "skipped": [], "changed": [], "finite_weights": []}
    if phase == "resume":
        record["resumed_from"] = str(trainer.resume(out))
    while trainer.state.step < 5:
        before = [p.detach().float().clone() for _, p in trainer.trainable]
        result = trainer.train_step(trainer.next_micro_batches())
        after = [p.detach().float() for _, p in trainer.trainable]
        record["loss"].append(result.loss)
        record["skipped"].append(result.skipped)
        record["changed"].append(any(not torch.equal(a, b) for a, b in zip(before, after)))
        record["finite_weights"].append(all(bool(torch.isfinite(a).all()) for a in after))
        if phase != "resume" and trainer.state.step == 3:
            trainer.save_checkpoint(out)
    record["total_nonfinite"] = trainer.state.total_nonfinite
    record["weight_dtypes"] = sorted({str(p.dtype) for _, p in trainer.trainable})
    return record


def main() -> None:
    from accelerate.state import AcceleratorState, GradientState

    for i, (phase, out) in enumerate(PHASES):
        if i:  # accelerate's process-wide singletons start afresh; the process group stays (DeepSpeed holds it)
            AcceleratorState._reset_state()
            GradientState._reset_state()
        print("RESULT " + json.dumps({"phase": phase, **run_phase(phase, out)}), flush=True)
    AcceleratorState().destroy_process_group()


if __name__ == "__main__":
    main()
