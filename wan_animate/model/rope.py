"""3D rotary position embedding (RoPE) as real cos/sin tables.

Each attention head's channels are split into a time part and two spatial parts
(``config.rope_split``, 44/42/42 for head_dim 128). Channel pairs ``(2i, 2i+1)`` are rotated by
``pos_axis * theta ** (-2i / axis_dim)``; positions start at 0 on each axis (the reference latent
slot is t = 0). The tables are built once per grid (in float64, then stored as float32) and cached,
so the hot path is two multiplies and an add per element, with no complex numbers.
"""

from __future__ import annotations

import torch

# ---- Tables


def _axis_angles(num_positions: int, axis_dim: int, theta: float, dtype: torch.dtype, offset: int = 0,
                 stride: int = 1) -> torch.Tensor:
    """Rotation angles of one axis: [num_positions, axis_dim // 2] at positions offset + i * stride."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=dtype) / axis_dim))
    positions = torch.arange(num_positions, dtype=dtype) * stride + offset
    return torch.outer(positions, inv_freq)


def build_rope_tables(
    grid: tuple[int, int, int],
    split: tuple[int, int, int],
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    offsets: tuple[int, int, int] = (0, 0, 0),
    time_stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for a (frames, height, width) token grid.

    Returns two float32 tensors of shape ``[F*H*W, head_dim // 2]`` in token order
    (frame-major, then row, then column), the order of the flattened patch grid. Token (f, h, w)
    sits at position ``(offsets[0] + f * time_stride, offsets[1] + h, offsets[2] + w)``; a second
    stream placed beside the first (Animate-2's driving tokens) uses non-zero offsets.
    """
    frames, height, width = grid
    angles = []
    for axis, (n, axis_dim) in enumerate(zip(grid, split)):
        stride = time_stride if axis == 0 else 1
        a = _axis_angles(n, axis_dim, theta, dtype, offsets[axis], stride)  # [n, axis_dim/2]
        view = [1, 1, 1, a.shape[-1]]
        view[axis] = n
        angles.append(a.view(view).expand(frames, height, width, -1))
    angle = torch.cat(angles, dim=-1).reshape(frames * height * width, -1)  # [L, head_dim/2]
    return angle.cos().float().to(device), angle.sin().float().to(device)


class RopeCache:
    """Cached tables per (grid, device). Small: one grid is L x head_dim/2 floats per table."""

    def __init__(self, split: tuple[int, int, int], theta: float, max_entries: int = 8):
        self.split = tuple(split)
        self.theta = float(theta)
        self.max_entries = max_entries
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, grid: tuple[int, int, int], device: torch.device, offsets: tuple[int, int, int] = (0, 0, 0),
                 time_stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # Inside a compiled graph a Python-side cache would cost guards and graph breaks; the
            # table is then built in float32 as part of the graph (cheap: L x head_dim/2 values).
            return build_rope_tables(grid, self.split, self.theta, device=device, dtype=torch.float32,
                                     offsets=offsets, time_stride=time_stride)
        key = (tuple(int(g) for g in grid), str(device), tuple(int(o) for o in offsets), int(time_stride))
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= self.max_entries:
                self._tables.pop(next(iter(self._tables)))
            tables = build_rope_tables(grid, self.split, self.theta, device=device, offsets=offsets,
                                       time_stride=time_stride)
            self._tables[key] = tables
        return tables


# ---- Application


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x.float().unflatten(-1, (-1, 2))  # [B, L, heads, head_dim/2, 2]
    x_even, x_odd = x[..., 0], x[..., 1]
    cos = cos[None, :, None, :]  # [1, L, 1, head_dim/2]
    sin = sin[None, :, None, :]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2)


class _Rope(torch.autograd.Function):
    """A rotation is orthogonal: the backward is the inverse rotation of the gradient, so no
    activation is saved (autograd would keep an fp32 copy of q and of k per block)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.input_dtype = x.dtype
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin).to(ctx.input_dtype), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` [B, L, heads, head_dim] (computed in fp32).

    ``cos``/``sin`` are ``[L, head_dim // 2]``. Returns float32 of the shape of ``x``.
    """
    return _Rope.apply(x, cos, sin)
