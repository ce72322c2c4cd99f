"""DeepSpeed-Ulysses sequence parallelism for the Wan-Animate DiT, applied from outside the model.

    group = sequence_parallel_mesh(2, "cpu")["sequence"].get_group()
    apply_sequence_parallel(dit, group)   # every rank of ``group`` then runs the same sample
    velocity = dit(**inputs)              # full output on every rank; each rank did 1/N of the work

A group of N ranks shares one sample. After the embeddings each rank keeps a contiguous 1/N of the
video tokens (padded at the end to a multiple of N) through every block. Self-attention exchanges
tokens for heads (all-to-all), so each rank attends over the whole sequence with num_heads / N
heads; the padding is dropped from the keys. Cross-attention, FFN, modulation and the head are per
token; RoPE takes the shard's rows. A face block runs once per part of the shard (partial first
frame, whole frames, partial last frame), so a frame split by a shard boundary is exact. The motion
encoder splits the face frames across the group; its output and the head's are gathered with
``all_gather_single_autograd`` (``torch.distributed.nn.functional.all_gather``'s gloo backward
treats group ranks as global ranks and fails in any group but the first).

Gradients: every rank computes the same output and loss; the all_gather backward sums the N ranks'
gradients, so the *mean over the group* is the single-process gradient, and data-parallel
averaging over all G x N ranks gives the mean over the G samples with no loss scaling
(``tests/test_sequence_parallel.py``).

One forward records where the tokens lie (``TokenLayout``); activation-checkpoint recomputation
reuses it, so run each forward's backward before a forward of another token count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_single_autograd

from wan_animate.model import WanAnimateDiT
from wan_animate.model.attention import attention


def check_sequence_parallel_size(num_heads: int, size: int, key: str = "train.sequence_parallel") -> None:
    """Ulysses gives each rank num_heads / size whole heads: ``size`` must divide ``num_heads``."""
    if size < 1 or num_heads % size:
        valid = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
        raise ValueError(
            f"{key}={size}: sequence parallelism splits the model's {num_heads} attention heads "
            f"(model config num_heads) evenly across the ranks of a group, so it must divide "
            f"{num_heads}; valid values: {valid}."
        )


def sequence_parallel_mesh(size: int, device_type: str):
    """A 2D DeviceMesh ("data", "sequence") over all ranks: consecutive ranks form a sequence group
    (``mesh["sequence"].get_group()``); ``mesh["data"]`` gives the rank / size to shard the data by.
    ``size`` divides the world size (the caller's check: ``train.config.check_sequence_parallel``)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    return init_device_mesh(device_type, (world // size, size), mesh_dim_names=("data", "sequence"))


def start_generation_group(size: int, device: str) -> tuple[str, bool]:
    """``torchrun --nproc_per_node N -m eval.generate ... --sequence-parallel N``: join the N
    processes and pick this rank's device ("cuda" -> cuda:LOCAL_RANK). Returns (device,
    writes_output): all ranks end with the same video; rank 0 writes it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise ValueError(
            f"--sequence-parallel {size} needs {size} processes, but WORLD_SIZE={world}: launch with "
            f"torchrun --nproc_per_node {size} -m eval.generate ..."
        )
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, dist.get_rank() == 0


def check_same_sample(inputs: dict[str, torch.Tensor], group: dist.ProcessGroup) -> None:
    """Raise if the ranks of ``group`` do not hold the same DiT inputs (data, noise, timestep): a
    rank that drew another one would silently train on a mixture. One all_gather of per-tensor sums."""
    names = sorted(inputs)
    device = _collective_device(group, inputs.values())
    # Each sum is taken where its tensor lives, then moved: the inputs mix devices (the batch on the
    # GPU, the noise generator's state on the host).
    sums = torch.stack([inputs[n].detach().double().sum().to(device) for n in names])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, sums, group=group)
    table = torch.stack(gathered).cpu()  # [ranks, inputs], one device-to-host copy
    for i, name in enumerate(names):
        values = table[:, i].tolist()
        if any(v != values[0] for v in values):
            raise RuntimeError(
                f"sequence parallelism: input {name!r} differs across the ranks of a group (sums "
                f"{values}); all ranks of a group must read the same sample and draw the same noise and "
                "timestep: shard the data and seed those generators by the data-parallel rank "
                "(mesh['data'].get_local_rank()), not the global rank."
            )


def skip_deepspeed_shm_op() -> None:
    """Call before DeepSpeed's communication starts. On a CPU accelerator DeepSpeed compiles a
    shared-memory all-reduce op at the first launch on a machine (C++, about 20 s, and it needs a
    compiler); only its inference all-reduce uses it. Training and sequence parallelism reduce through
    the torch.distributed group (gloo on CPU), so the op is marked unavailable and never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _collective_device(group: dist.ProcessGroup, tensors) -> torch.device:
    """Where ``group``'s collectives take their tensors: the host for gloo, else (NCCL) the device
    of the inputs that are not on the host (the current CUDA device when all are)."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    found = next((t.device for t in tensors if t.device.type != "cpu"), None)
    return found if found is not None else torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class TokenLayout:
    """Where this rank's tokens lie in the flattened (frame, row, column) token sequence."""

    total: int  # real tokens of the sample
    padded: int  # total rounded up to a multiple of the group size
    start: int  # first global position held here
    local: int  # positions held here (padded / group size), the last ones may be padding
    tokens_per_frame: int

    @property
    def real_end(self) -> int:
        """One past the last real (non-padding) position held here."""
        return max(self.start, min(self.start + self.local, self.total))

    def frame_parts(self) -> list[tuple[int, int]]:
        """[start, end) global ranges of the real tokens here, cut so each is either one (partial)
        frame or a run of whole frames: at most a partial first frame, whole frames, a partial last."""
        hw = self.tokens_per_frame
        parts, pos, end = [], self.start, self.real_end
        while pos < end:
            if pos % hw or end - pos < hw:  # a partial frame: up to the next frame boundary
                stop = min(end, (pos // hw + 1) * hw)
            else:  # whole frames
                stop = pos + (end - pos) // hw * hw
            parts.append((pos, stop))
            pos = stop
        return parts


class SequenceParallel:
    """The plan ``apply_sequence_parallel`` installs: split / gather in the DiT forward, the Ulysses
    attention kernel, the frame-aware face-block call and the split motion encoder."""

    def __init__(self, group: dist.ProcessGroup, num_heads: int):
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention  # slow import; only when used

        if not deepspeed.comm.is_initialized():  # its collectives run on our torch process group
            skip_deepspeed_shm_op()
            deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_sequence_parallel_size(num_heads, self.size)
        self.layout: TokenLayout | None = None
        # [B, S/N, H, D] -> heads scattered (dim 2), sequence gathered (dim 1) -> local kernel.
        self._ulysses = DistributedAttention(self._local_attention, group, scatter_idx=2, gather_idx=1)

    def split(
        self, h: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, grid: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, L, dim] and the [L, D/2] RoPE tables -> this rank's rows (padded at the end)."""
        total = h.shape[1]
        local = math.ceil(total / self.size)
        self.layout = TokenLayout(total, local * self.size, self.rank * local, local, grid[1] * grid[2])
        start = self.layout.start
        # Padding rows: zero tokens and the identity rotation; keys there are dropped in attention.
        # New tensors of the local size: a view would keep the full (padded) residual alive.
        return (_rows(h, 1, start, local, total, 0.0), _rows(rope_cos, 0, start, local, total, 1.0),
                _rows(rope_sin, 0, start, local, total, 0.0))

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Per-token head output [B, local, C] -> [B, L, C] on every rank (autograd-aware)."""
        layout = self._current(out.shape[1])
        return all_gather_single_autograd(out.contiguous(), gather_dim=1, group=self.group)[:, : layout.total]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention kernel for the shard: q/k/v [B, local, H, D] -> [B, local, H, D]."""
        self._current(q.shape[1])
        return self._ulysses(q, k, v, batch_dim_idx=0)

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # After the all-to-all: the whole padded sequence, H/N heads. The padding is the tail of
        # the global sequence, so dropping those keys masks it exactly (and keeps flash kernels).
        total = self.layout.total
        return attention(q, k[:, :total], v[:, :total])

    def face_update(self, block_forward: Callable, x: torch.Tensor, face_tokens: torch.Tensor) -> torch.Tensor:
        """A face block on the shard: each part (see ``TokenLayout.frame_parts``) attends to its
        own frames' face tokens; padding rows get a zero update."""
        layout = self._current(x.shape[1])
        hw, start = layout.tokens_per_frame, layout.start
        updates = [
            block_forward(x[:, a - start : b - start], face_tokens[:, a // hw : -(-b // hw)])
            for a, b in layout.frame_parts()
        ]
        pad = layout.start + layout.local - layout.real_end
        if pad or not updates:
            dtype = updates[0].dtype if updates else face_tokens.dtype
            updates.append(x.new_zeros(x.shape[0], pad, x.shape[2], dtype=dtype))
        return torch.cat(updates, dim=1)

    def encode_motion(self, encoder_forward: Callable, faces: torch.Tensor) -> torch.Tensor:
        """faces [n, 3, S, S] -> motion [n, C]: each rank encodes ceil(n / N) of them, then all_gather."""
        n = faces.shape[0]
        per_rank = math.ceil(n / self.size)
        padded = F.pad(faces, (0, 0, 0, 0, 0, 0, 0, per_rank * self.size - n))
        mine = padded[self.rank * per_rank : (self.rank + 1) * per_rank]
        return all_gather_single_autograd(encoder_forward(mine).contiguous(), gather_dim=0, group=self.group)[:n]

    def _current(self, local_len: int) -> TokenLayout:
        layout = self.layout
        if layout is None or local_len != layout.local:
            raise RuntimeError(
                f"sequence parallelism: got {local_len} tokens per rank but the last DiT forward "
                f"split {layout.local if layout else 'nothing'}; run each forward's backward before "
                "a forward of another size, and call the DiT itself (not its blocks) under SP."
            )
        return layout


def _rows(t: torch.Tensor, dim: int, start: int, count: int, total: int, fill: float) -> torch.Tensor:
    """Rows [start, start + count) of ``t`` along ``dim`` as a new tensor; rows past ``total``
    (the padding) hold ``fill``."""
    real = max(0, min(count, total - start))
    part = t.narrow(dim, min(start, total), real)
    shape = list(t.shape)
    shape[dim] = count - real
    return torch.cat([part, t.new_full(shape, fill)], dim=dim)


def apply_sequence_parallel(dit: WanAnimateDiT, group: dist.ProcessGroup) -> SequenceParallel:
    """Make ``dit`` (before any DDP/ZeRO wrapping) run one sample across ``group``: installs the plan
    on the model's seams (``dit.sequence_shard``, each ``SelfAttention.attention_fn``, the face
    blocks' and motion encoder's ``forward``; names and state dict unchanged). Returns the plan."""
    if not isinstance(dit, WanAnimateDiT):
        raise TypeError(
            f"sequence parallelism needs a wan_animate WanAnimateDiT (its split/gather seams), got "
            f"{type(dit).__name__}; load the model with wan_animate.load_dit."
        )
    if dit.sequence_shard is not None:
        raise ValueError("apply_sequence_parallel was already applied to this model.")
    plan = SequenceParallel(group, dit.config.num_heads)
    dit.sequence_shard = plan
    for block in dit.blocks:
        block.self_attn.attention_fn = plan.attention
    for face_block in dit.face_adapter.fuser_blocks:
        face_block.forward = lambda x, face_tokens, _inner=face_block.forward: plan.face_update(_inner, x, face_tokens)
    encoder = dit.motion_encoder
    encoder.forward = lambda faces, _inner=encoder.forward: plan.encode_motion(_inner, faces)
    return plan
