"""Start-up lines of third-party libraries that tell a training user nothing they can act on, each
dropped by name (a logging filter on the exact message, or the library's own switch) so every other
warning still shows: transformers' torchvision note (the PIL image processor is the one we want) and
per-file loading bars (the training bar is the one progress bar); DeepSpeed's "Setting accelerator
to CPU" probe (``DS_ACCELERATOR=cpu`` named up front without CUDA); torchao's import-time lines and
diffusers' torchao note (torchao is only used for ``optim.name=adamw8bit``). accelerate's and
DeepSpeed's INFO lines are raised to WARNING (they would break the training progress bar).
"""

from __future__ import annotations

import logging
import os

# logger name -> substrings of the messages to drop
_DROP = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "torchao": ("Failed to load", "Detected no triton"),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class _DropMessages(logging.Filter):
    def __init__(self, substrings: tuple[str, ...]):
        super().__init__()
        self.substrings = substrings

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a record that cannot format itself is not ours to judge
            return True
        return not any(s in msg for s in self.substrings)


def quiet_third_party() -> None:
    """Install the filters / switches above (idempotent); call before the libraries load."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in ("accelerate", "deepspeed", "DeepSpeed", "compilers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, texts in _DROP.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(texts))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
