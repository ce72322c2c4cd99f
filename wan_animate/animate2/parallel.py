"""DeepSpeed-Ulysses sequence parallelism for the Animate-2 DiT, applied from outside the model.

    group = sequence_parallel_mesh(2, "cpu")["sequence"].get_group()
    apply_sequence_parallel(dit, group)    # every rank of ``group`` then runs the same sample
    velocity = dit(x, t, ...)              # full output on every rank; each rank did 1/N of the work

A group of N ranks shares one sample. After the embeddings each rank keeps a contiguous 1/N of the
tokens of **each** stream (generation and driving, each padded at its end to a multiple of N) and
carries only those through every block:

- self-attention: q / k / v are projected on the shard, then exchanged with an all-to-all so that
  each rank holds the **whole** sequence of both streams for num_heads / N heads (padding rows
  dropped). RoPE is applied after the exchange with the full tables, then the unchanged kernels
  run: plain attention in the driving stream, the in-context attention
  (``wan_animate.animate2.attention``: the same mask, the same layout) in the generation stream.
  The output goes back to token shards with the reverse all-to-all. The driving stream's K/V that
  the generation stream (or the inference cache) reads are the exchanged ones (whole sequence, the
  rank's heads), so the extract pass, the joint training pass and cached generation all work;
- cross-attention (text / CLIP), FFN and modulation are per token and run on the shard unchanged;
- head: per token, on the shard; its output is all-gathered (autograd-aware) and the padding dropped.

Gradients: every rank of a group computes the same full output, so each backpropagates the same
loss; the all-gather's backward sums the group, so the group's mean gradient is exact (as for
Wan-Animate-14B: ``wan_animate.parallel``), and data-parallel / ZeRO averaging needs no
scaling. The all-to-alls are exact in both directions.
"""

from __future__ import annotations

import math
from types import MethodType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_single_autograd, all_to_all_single_autograd

from wan_animate.animate2.attention import incontext_attention
from wan_animate.model.attention import attention
from wan_animate.model.rope import apply_rope
from wan_animate.parallel import check_sequence_parallel_size

__all__ = ["Animate2SequenceParallel", "apply_sequence_parallel"]


class Animate2SequenceParallel:
    """The plan: token shards of both streams, head-for-token exchanges around the attentions."""

    def __init__(self, group: dist.ProcessGroup, num_heads: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_sequence_parallel_size(num_heads, self.size)
        self.lengths: dict[str, int] = {}  # stream -> its true token count in the current forward

    # ---------------------------------------------------------------------------------- token shards
    def split(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """[B, L, dim] -> this rank's rows [B, ceil(L / N), dim] (zero padding at the end)."""
        total = x.shape[1]
        self.lengths[stream] = total
        local = math.ceil(total / self.size)
        x = F.pad(x, (0, 0, 0, local * self.size - total))
        return x[:, self.rank * local: (self.rank + 1) * local]

    def gather(self, out: torch.Tensor, stream: str) -> torch.Tensor:
        """Per-token output [B, local, C] -> [B, L, C] on every rank (autograd-aware)."""
        full = all_gather_single_autograd(out.contiguous(), gather_dim=1, group=self.group)
        return full[:, : self.lengths[stream]]

    # ---------------------------------------------------------------------------------- all-to-all
    def to_heads(self, t: torch.Tensor, stream: str) -> torch.Tensor:
        """[B, local, H, D] token shard -> [B, L, H / N, D]: the whole sequence, this rank's heads."""
        b, local, h, d = t.shape
        n = self.size
        # rank r sends head group j to rank j; it receives every rank's rows of its own head group
        send = t.reshape(b, local, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # [N, B, local, H/N, D]
        recv = all_to_all_single_autograd(send.flatten(0, 1), None, None, self.group)  # rank-major rows
        full = recv.view(n, b, local, h // n, d).permute(1, 0, 2, 3, 4).reshape(b, n * local, h // n, d)
        return full[:, : self.lengths[stream]]

    def to_tokens(self, t: torch.Tensor, stream: str) -> torch.Tensor:
        """[B, L, H / N, D] -> [B, local, H, D]: the inverse of ``to_heads``."""
        b, total, hn, d = t.shape
        n = self.size
        local = math.ceil(total / n)
        t = F.pad(t, (0, 0, 0, 0, 0, local * n - total))
        send = t.view(b, n, local, hn, d).permute(1, 0, 2, 3, 4).contiguous()  # [N, B, local, H/N, D]
        recv = all_to_all_single_autograd(send.flatten(0, 1), None, None, self.group)  # head-group-major
        return recv.view(n, b, local, hn, d).permute(1, 2, 0, 3, 4).reshape(b, local, n * hn, d)

    # ---------------------------------------------------------------------------------- the blocks
    def extract(self, block, x, time_mod, text, image, rope_drv):
        """``Animate2Block.extract`` on a token shard; returns the driving K (normed, before RoPE)
        and V exchanged: whole sequence, this rank's heads."""
        sa = block.block.self_attn
        kv: list[torch.Tensor] = []

        def attend(h: torch.Tensor) -> torch.Tensor:
            dtype = h.dtype
            q, k, v = (self.to_heads(t, "driving") for t in sa.project(h))
            kv.extend((k.to(dtype), v))
            q, k = apply_rope(q, *rope_drv), apply_rope(k, *rope_drv)
            out = attention(q.to(dtype), k.to(dtype), v)
            return sa.o(self.to_tokens(out, "driving").flatten(2))

        x = block.block.run(x, time_mod, text, image, attend)
        return x, kv[0], kv[1]

    def generate(self, block, x, time_mod, text, image, rope_gen, rope_drv, k_drv, v_drv, layout, log_scale):
        """``Animate2Block.generate`` on a token shard, with the exchanged driving K/V of ``extract``."""
        sa = block.block.self_attn

        def attend(h: torch.Tensor) -> torch.Tensor:
            dtype = h.dtype
            q, k, v = (self.to_heads(t, "generation") for t in sa.project(h))
            q, k = apply_rope(q, *rope_gen), apply_rope(k, *rope_gen)
            kd = apply_rope(k_drv, *rope_drv)
            out = incontext_attention(q.to(dtype), k.to(dtype), v, kd.to(dtype), v_drv.to(dtype), layout, log_scale)
            return sa.o(self.to_tokens(out, "generation").flatten(2))

        return block.block.run(x, time_mod, text, image, attend)


def apply_sequence_parallel(dit, group: dist.ProcessGroup | None,
                            plan: Animate2SequenceParallel | None = None) -> Animate2SequenceParallel:
    """Make an ``Animate2DiT`` (before any DDP / ZeRO wrapping) run one sample across ``group``:
    its stream embedding splits tokens, each block's ``extract`` / ``generate`` exchange heads for
    tokens around the attention, the head's output is gathered (names and state dict unchanged).
    All ranks of ``group`` must call the model with the same inputs. Returns the plan. ``plan``
    installs another plan object instead (the memory planner's one-process model of a rank)."""
    from wan_animate.animate2.model import Animate2DiT

    if not isinstance(dit, Animate2DiT):
        raise TypeError(f"Animate-2 sequence parallelism needs an Animate2DiT, got {type(dit).__name__}.")
    if getattr(dit, "sequence_shard", None) is not None:
        raise ValueError("apply_sequence_parallel was already applied to this model.")
    plan = plan or Animate2SequenceParallel(group, dit.config.num_heads)
    dit.sequence_shard = plan
    stream_fn = dit._stream

    def _stream(self, latents, cond, t, context, clip_fea, name):
        s = stream_fn(latents, cond, t, context, clip_fea, name)
        s.x = plan.split(s.x, "generation" if name == "x" else "driving")
        return s

    dit._stream = MethodType(_stream, dit)
    head_forward = dit.head.forward
    dit.head.forward = lambda x, e: plan.gather(head_forward(x, e), "generation")
    for block in dit.blocks:
        block.extract = MethodType(plan.extract, block)
        block.generate = MethodType(plan.generate, block)
    return plan
