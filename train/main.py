"""Entry point: ``accelerate launch train/main.py [hydra overrides]`` (or ``python -m train.main``).

With no override it runs the embedded quick start (experiment=quickstart): a tiny random model
folder and a synthetic data set are written under ``<output_dir>/cache`` on first use, then a
short CPU/GPU training run produces a loss curve, checkpoints, exports and a validation video.
The project is installed (``pip install -e .``), so ``train`` imports from any working directory.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from train.config import ConfigError, register_configs, to_config

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from train.quiet import quiet_third_party

    quiet_third_party()  # before the libraries whose start-up lines it drops are imported
    try:
        config = to_config(cfg)  # validated before any model loads
    except ConfigError as e:
        print(f"[train] configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    if config.train.dry_run == "memory":  # plan the step on fake tensors instead of training
        from train.memory_plan import run_dry

        run_dry(config)
        return
    from train.loop import run

    try:
        run(config)
    except ConfigError as e:  # launch-time checks (world, DeepSpeed, output_dir, data), before any model loads
        print(f"[train] configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        _teardown()


def _teardown() -> None:
    """Release what a crashed run would leave behind (the normal path already closed these)."""
    import torch.distributed as dist

    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)
    except ImportError:
        pass
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
