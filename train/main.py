"""Entry point: ``accelerate launch train/main.py [hydra overrides]`` (or ``python -m train.main``).

With no override it runs the embedded quick start (experiment=quickstart): a tiny random model
folder and a synthetic data set are written under ``<output_dir>/cache`` on first use, then a
short CPU/GPU training run produces a loss curve, checkpoints, exports and a validation video.
The project is installed (``pip install -e .``), so ``train`` imports from any working directory.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from train.config import ConfigError, check_paths, register_configs, to_config
from wan_animate.options import HYDRA_VERSION_BASE

register_configs()


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path="../conf/train", config_name="config")
def main(cfg: DictConfig) -> None:
    from wan_animate.quiet import quiet_third_party

    quiet_third_party()  # before the libraries whose start-up lines it drops are imported
    try:
        config = to_config(cfg)  # validated before any model loads
        check_paths(config)
    except ConfigError as e:
        print(f"[train] configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    if config.train.dry_run == "memory":  # plan the step on fake tensors instead of training
        from train.plan.planner import run_dry

        run_dry(config)
        return
    from train.loop import run
    from train.checkpoint.run_lock import RunLockedError, acquire, release
    from train.signals import stop_with_launcher

    lock = None
    try:
        if _global_rank() == 0:  # one run per output_dir; the other ranks follow rank 0
            lock = acquire(config.train.output_dir)  # the config is recorded once: <output_dir>/config.json
        stop_with_launcher()  # a launcher killed by SIGTERM/SIGUSR1 still stops this trainer cleanly
        run(config)
    except (ConfigError, RunLockedError) as e:  # launch-time checks (lock, world, DeepSpeed, output_dir, data)
        print(f"[train] configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        _teardown()
        if lock is not None:
            release(lock)


def _global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _teardown() -> None:
    """Release what a crashed run would leave behind (the normal path already closed these)."""
    import torch.distributed as dist
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
