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

from train.config import CONF_DIR, Config, ConfigError, check_paths, register_configs, to_config
from wan_animate.cli import (check_overrides, config_groups, expected_errors, fail, one_line, skip_collection_at_exit,
                             take_debug_flag)
from wan_animate.options import HYDRA_VERSION_BASE

register_configs()
PREFIX = "[train] configuration error: "


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path="../conf/train", config_name="config")
def main(cfg: DictConfig) -> None:
    from wan_animate.quiet import quiet_third_party

    with expected_errors(PREFIX, (ConfigError,)):
        import torch

        from train.parallel import check_launch_devices

        check_launch_devices(dict(os.environ), torch.cuda.device_count())  # before DS_ACCELERATOR is set below
        quiet_third_party()  # before the libraries whose start-up lines it drops are imported
        config = to_config(cfg)  # validated before any model loads
        check_paths(config)
    if config.train.dry_run == "memory":  # plan the step on fake tensors instead of training
        from train.plan.planner import plan_memory

        with expected_errors(PREFIX, (ConfigError,)):
            plan_memory(config, suggest=True, quiet=False)  # the table, the verdict and memory_plan.json
        return
    from train.checkpoint.run_dir import check_fresh_start
    from train.checkpoint.run_lock import RunLockedError, acquire, release
    from train.checkpoint.store import CheckpointSaveError, NoUsableCheckpointError
    from train.checkpoint.verify import UnsafeCheckpointError
    from train.loop import run
    from train.signals import stop_with_launcher

    lock = None
    try:
        with expected_errors(PREFIX, (ConfigError, RunLockedError)):  # launch-time checks and bad inputs
            if os.environ.get("RANK", "0") == "0":  # one run per output_dir; the other ranks follow rank 0
                lock = acquire(config.train.output_dir)  # the config is recorded once: <output_dir>/config.json
                check_fresh_start(config, main=True)  # rank 0, before the other ranks start: moved aside or refused
            stop_with_launcher()  # a launcher killed by SIGTERM/SIGUSR1 still stops this trainer cleanly
            try:
                run(config)
            except (NoUsableCheckpointError, UnsafeCheckpointError, CheckpointSaveError) as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":  # --debug
                    raise
                fail("[train] error: ", one_line(e), status=1)  # damaged / unwritable checkpoints: one line
    finally:
        _teardown()
        if lock is not None:
            release(lock)


def _teardown() -> None:
    """Release what a crashed run would leave behind (the normal path already closed these)."""
    import torch.distributed as dist

    wandb = sys.modules.get("wandb")  # imported by the metrics logger (rank 0) only
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli() -> None:
    """``--debug`` / ``HYDRA_FULL_ERROR=1`` keep tracebacks; a key that is not in the schema is refused
    with the closest one before Hydra composes anything."""
    skip_collection_at_exit()
    take_debug_flag(sys.argv)
    check_overrides(PREFIX, sys.argv[1:], Config, config_groups(CONF_DIR))
    main()


if __name__ == "__main__":
    cli()
