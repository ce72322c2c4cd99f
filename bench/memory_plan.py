"""Memory plans of every 14B preset (train/plan/planner.py), written to bench/results/memory-plan.md.

    python bench/memory_plan.py [--only animate14b_lora ...] [--out bench/results/memory-plan.md]

Each preset is planned in its own process exactly as
``accelerate launch train/main.py experiment=<preset> train.dry_run=memory model.path=<folder>``
would: the model folder holds only the 14B ``config.json`` (no weights exist here), so the encoders
come from their published sizes. 832x480 x 77 frames, micro-batch 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["data.clip_len=77", "data.buckets=[[480,832]]"]
CASES = [  # (name, experiment, extra overrides, world size); budgets: each row's target card
    ("animate14b_lora", "animate14b_lora", ["train.plan_budget_gib=64"], 1),
    ("animate14b_lora_24gb", "animate14b_lora_24gb", ["train.plan_budget_gib=22"], 1),
    ("character_lora", "character_lora", ["train.plan_budget_gib=64"], 1),
    ("character_lora_24gb", "character_lora_24gb", ["train.plan_budget_gib=22"], 1),
    ("animate14b_full (1 of 8, ZeRO-3)", "animate14b_full", ["train.plan_world_size=8", "train.plan_budget_gib=70"], 8),
    ("animate14b_full 720x1280 (1 of 8, ZeRO-3)", "animate14b_full",
     ["train.plan_world_size=8", "data.buckets=[[720,1280]]"], 8),
    # sequence parallelism (train/plan/sequence.py): one rank of a group of 8 holds 1/8 of the tokens
    ("animate14b_full 720x1280 SP=8 (1 of 8, ZeRO-3, train.sequence_parallel=8)", "animate14b_full",
     ["train.plan_world_size=8", "data.buckets=[[720,1280]]", "train.sequence_parallel=8", "train.plan_budget_gib=70"],
     8),
    ("animate14b_full 720x1280 SP=8 cached latents (1 of 8, ZeRO-3, train.sequence_parallel=8)", "animate14b_full",
     ["train.plan_world_size=8", "data.buckets=[[720,1280]]", "train.sequence_parallel=8", "data.source=cached"], 8),
]
# "fits an N GB card": the planned peak leaves ~8% of the card to what the planner does not count
# (CUDA context, cuBLAS / attention workspaces, allocator fragmentation)
CARDS = {24: 22.0, 48: 44.0, 80: 74.0}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0])


COLUMNS = ["frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations", "temporaries",
           "inputs", "frozen_encoders", "encoder_activations", "zero3_gathered_params", "ddp_grad_buckets"]


def _plan(experiment: str, extra: list[str], folder: str, out: str, suggest: bool) -> dict:
    overrides = [f"experiment={experiment}", f"model.path={folder}", "data.urls=[unused]", *SIZE, *extra,
                 f"train.output_dir={out}", "train.dry_run=memory"]
    code = ("import sys, json; from train.config import compose; from train.plan.planner import plan_memory; "
            f"p = plan_memory(compose(sys.argv[1:]), suggest={suggest}, write=True, quiet=False)")
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", code, *overrides], cwd=ROOT, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed",
                "overrides": overrides}
    plan = json.loads((Path(out) / "memory_plan.json").read_text())
    plan["wall_s"] = round(time.time() - t0, 1)
    plan["overrides"] = overrides
    return plan


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--suggest", action="store_true", help="re-plan non-fitting presets with each memory option")
    ap.add_argument("--out", default=str(ROOT / "bench/results/memory-plan.md"))
    ap.add_argument("--plans", help="folder of the plans (<plans>/<row>/memory_plan.json); default: a new temp folder")
    ap.add_argument("--render-only", action="store_true", help="render the plans already in --plans, plan nothing")
    args = ap.parse_args()
    tmp = Path(args.plans or tempfile.mkdtemp(prefix="memory-plan-"))
    folder = tmp / "Wan2.2-Animate-14B"
    folder.mkdir(parents=True, exist_ok=True)
    from wan_animate.config import WanAnimateConfig

    (folder / "config.json").write_text(json.dumps(WanAnimateConfig.preset("14b").to_official_config()))
    rows = []
    for name, exp, extra, world in CASES:
        if args.only and name.split()[0] not in args.only:
            continue
        out = tmp / slug(name)
        if args.render_only:
            if (out / "memory_plan.json").is_file():
                rows.append((name, {**json.loads((out / "memory_plan.json").read_text()), "command": command(exp, extra)}))
            continue
        print(f"[bench] {name} ...", flush=True)
        plan = _plan(exp, extra, str(folder), str(out), suggest=args.suggest)
        rows.append((name, {**plan, "command": command(exp, extra)}))
        print(_table(plan), flush=True)
        Path(args.out).write_text(render(rows))  # after every row: partial results survive
    if args.render_only:
        Path(args.out).write_text(render(rows))
    print(f"[bench] wrote {args.out}")
    return 0


def _table(plan: dict) -> str:
    from train.plan.report import format_plan

    return plan["error"] if "error" in plan else format_plan(plan)


def command(experiment: str, extra: list[str]) -> str:
    """The training command that writes this row's plan (``<train.output_dir>/memory_plan.json``)."""
    return " ".join(["accelerate launch train/main.py", f"experiment={experiment}", "train.dry_run=memory",
                     "model.path=<Wan2.2-Animate-14B folder>", "data.urls=[<shards>]",
                     *(o for o in SIZE if o.split("=")[0] not in {e.split("=")[0] for e in extra}), *extra])


def render(rows) -> str:
    lines = ["# Memory plans of the 14B presets (train.dry_run=memory)", "",
             "One training step of each preset at 832x480 (H x W = 480 x 832), 77 frames (latent 16 x 21 x 60 x 104,",
             "32,760 tokens), micro-batch 1, planned on fake tensors by `train/plan/planner.py` (no GPU, no weights).",
             "GiB per category at the device peak of one rank; the exact command of each row is listed below.",
             "`target` is the device-memory budget of the row (`train.plan_budget_gib`), `meets` whether the peak is within it.",
             "", "Regenerate: `python bench/memory_plan.py` (one process per row, a few minutes each on 2 cores);",
             "`--plans DIR` keeps each row's `memory_plan.json` in `DIR/<row>/`, `--render-only` renders them.", "",
             "**Measured on fake tensors** (live storages during a real forward/backward/optimizer step): frozen",
             "and trainable weights, gradients, AdamW states (single GPU), activations (created in forward,",
             "alive at the peak), temporaries (created in backward: recompute + gradients of activations; under",
             "DeepSpeed also the step's fp32 gradient of one optimizer sub-group, allocated by the planned step at",
             "its computed size), inputs, frozen encoders' weights (on the device only in the encode phase) and",
             "one encode's activations, pinned host memory.",
             "**Computed** (formulas in `train/plan/planner.py`): torchao AdamW8bit states (2 x (1 B + 4 B / 256)",
             "per trainable parameter: its quantisation cannot run on fake tensors); under DeepSpeed the",
             "optimizer states (fp32 master + Adam m, v = 12 B per parameter / N), the bf16 gradient partition +",
             "one reduce bucket, and under ZeRO-3 the 1/N of the weights plus the gathered working set",
             "(`zero3_gathered_params`: two largest blocks in bf16 + the small persistent parameters); host RAM",
             "adds the DiT read on the CPU before it moves to the device.", "",
             "| preset | ranks | peak GiB | target | meets | 24 GB | 48 GB | 80 GB | " + " | ".join(COLUMNS)
             + " | host pinned | host RAM |",
             "|" + "---|" * (len(COLUMNS) + 10)]
    for name, p in rows:
        if "error" in p:
            lines.append(f"| {name} | | error: {p['error'][:120]} |" + " |" * (len(COLUMNS) + 7))
            continue
        cats = " | ".join(f"{p['by_category'].get(c, 0.0):.1f}" for c in COLUMNS)
        cards = " | ".join("yes" if p["peak_device_gib"] <= limit else "no" for limit in CARDS.values())
        lines.append(f"| {name} | {p['world_size']} | **{p['peak_device_gib']:.1f}** | {p['budget_gib']:g} | "
                     f"{'yes' if p['fits'] else 'no'} | {cards} | {cats} | {p['host_pinned_gib']:.1f} | "
                     f"{p['host_ram_gib']:.1f} |")
    cards_rule = ", ".join(f"{v:g} GiB ({k} GB)" for k, v in CARDS.items())
    lines += ["", (f"N GB card: peak <= {cards_rule}, i.e. ~8% left to what the planner does not count "
                   "(CUDA context, library workspaces, fragmentation)."), "",
              "## Command per row", ""]
    for name, p in rows:
        lines.append(f"- {name}: `{p['command']}`")
    lines += ["", "## Options tried where a preset does not fit", ""]
    for name, p in rows:
        for t in p.get("options_tried", []):
            opts = " ".join(f"{k}={v}" for k, v in t["overrides"].items())
            lines.append(f"- {name}: `{opts}` -> {t['peak_device_gib']:.1f} GiB ({'fits' if t['fits'] else 'does not fit'})")
    lines += ["", "## Planner output per preset", ""]
    for name, p in rows:
        lines += [f"### {name}", "", "```", _table(p).strip(), "```", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
