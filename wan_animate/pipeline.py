"""The one generation path: reference image + driving streams -> video.

Training validation, eval sweeps and ``python -m eval.generate`` all call ``generate`` of a family's
pipeline (:class:`AnimatePipeline` for Wan-Animate-14B; a subclass per other family): check the
inputs, mirror-pad the driving streams to whole segments, encode the prompts and the reference once,
then per ``clip_len`` segment build the family's conditioning, sample, decode and drop the overlap
(:meth:`AnimatePipeline._run_segments`; facts section 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from wan_animate import official_encoders as oe
from wan_animate.conditioning import encode_condition, num_latent_frames, resize_frames
from wan_animate.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, WanAnimateConfig
from wan_animate.encoders import ImageEncoder, TextEncoder, WanVAE
from wan_animate.geometry import letterbox
from wan_animate.lora import apply_lora
from wan_animate.official_encoders import CLIP_FILE, T5_FILE, VAE_FILE
from wan_animate.options import check_frames_4n1, check_solver
from wan_animate.sampling import sample
from wan_animate.video_io import VideoDecodeError, frames_to_tensor, read_video, tensor_to_frames
from wan_animate.weights.files import load_torch_file
from wan_animate.weights.load import load_dit

SIZE_MULTIPLE = 16


class InputError(ValueError):
    """Bad generation input (raised before any model work)."""


class NonFiniteOutputError(RuntimeError):
    """The sampler produced NaN/Inf (a broken LoRA, an absurd scale): refused, nothing written."""


# ---------------------------------------------------------------------------- segments (facts section 6)


def padded_length(num_frames: int, clip_len: int, refert_num: int) -> int:
    """Smallest ``n * (clip_len - refert_num) + refert_num >= num_frames``."""
    return num_frames + (refert_num - num_frames) % (clip_len - refert_num)


def num_segments(num_frames: int, clip_len: int, refert_num: int) -> int:
    return (padded_length(num_frames, clip_len, refert_num) - refert_num) // (clip_len - refert_num)


def mirror_indices(num_frames: int, target: int) -> np.ndarray:
    """Indices walking forward and back over ``num_frames``: 5 -> 10 gives 0 1 2 3 4 3 2 1 0 1."""
    return np.pad(np.arange(num_frames, dtype=np.int64), (0, target - num_frames), mode="reflect")


# ---------------------------------------------------------------------------- input checks


def check_segments(clip_len: int, refert_num: int) -> None:
    try:
        check_frames_4n1(clip_len, "clip_len", minimum=5)
    except ValueError as e:
        raise InputError(str(e)) from None
    if not 1 <= refert_num < clip_len:
        raise InputError(f"refert_num={refert_num} must be in [1, clip_len) (official: 1 or 5).")


def check_sampling(*, steps: int, shift: float, guide_scale: float, solver: str, clip_len: int,
                   refert_num: int) -> None:
    """The sampling settings every family's ``generate`` takes; :class:`InputError` naming the key."""
    check_segments(clip_len, refert_num)
    try:
        check_solver(solver)
    except ValueError as e:
        raise InputError(str(e)) from None
    if steps < 1:
        raise InputError(f"steps={steps} must be >= 1.")
    # NaN passes every comparison: a NaN scale or shift sampled a black video
    if not (math.isfinite(shift) and shift > 0):
        raise InputError(f"shift={shift} must be a finite number > 0 (official 5.0).")
    if not (math.isfinite(guide_scale) and guide_scale >= 0):
        raise InputError(f"guide_scale={guide_scale} must be a finite number >= 0 (1.0: no guidance).")


def as_video(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"{name} must be a uint8 array [T, H, W, 3], got shape {x.shape}.")
    if x.dtype != np.uint8:
        raise InputError(f"{name} must be uint8 (0..255), got {x.dtype}.")
    return x


def check_driving(video: Any, name: str, refert_num: int) -> np.ndarray:
    """The stream that sets the output: uint8 [T, H, W, 3], sides multiples of 16, > refert_num frames."""
    video = as_video(video, name)
    t, h, w = video.shape[:3]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        m = SIZE_MULTIPLE
        raise InputError(f"{name.replace('_', ' ')} is {w}x{h}; width and height must be multiples of {m} "
                         f"(e.g. {w // m * m}x{h // m * m}).")
    if t <= refert_num:
        raise InputError(f"driving video has {t} frames; it needs more than refert_num={refert_num}.")
    return video


def _as_mask(x: Any) -> np.ndarray:
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if x.ndim == 4:  # a decoded mask video: first channel, as the official reader does
        x = x[..., 0]
    if x.ndim != 3:
        raise InputError(f"mask_video must be [T, H, W] or [T, H, W, 3], got shape {x.shape}.")
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


@dataclass
class DrivingInputs:
    pose: np.ndarray  # uint8 [T, H, W, 3]
    face: np.ndarray  # uint8 [T, h, w, 3]
    bg: np.ndarray | None  # uint8 [T, H, W, 3]
    mask: np.ndarray | None  # float32 [T, H, W] in [0, 1], 1 on the character

    @property
    def mode(self) -> str:
        return "replace" if self.bg is not None else "animate"


def check_inputs(pose_video: Any, face_video: Any, bg_video: Any = None, mask_video: Any = None, *,
                 clip_len: int = 77, refert_num: int = 1) -> DrivingInputs:
    """Validate Wan-Animate-14B's driving streams; raises :class:`InputError` naming the problem and the fix."""
    check_segments(clip_len, refert_num)
    pose = check_driving(pose_video, "pose_video", refert_num)
    face = as_video(face_video, "face_video")
    t, h, w = pose.shape[:3]
    if face.shape[0] != t:
        raise InputError(f"pose video has {t} frames but face video has {face.shape[0]}; they must match.")
    if (bg_video is None) != (mask_video is None):
        raise InputError("replace mode needs both bg_video and mask_video (or neither for animate mode).")
    bg = mask = None
    if bg_video is not None:
        bg, mask = as_video(bg_video, "bg_video"), _as_mask(mask_video)
        for name, arr in (("bg_video", bg), ("mask_video", mask)):
            if arr.shape[0] != t or tuple(arr.shape[1:3]) != (h, w):
                raise InputError(f"{name} is {arr.shape[0]} frames of {arr.shape[2]}x{arr.shape[1]}; it must "
                                 f"match the pose video ({t} frames of {w}x{h}).")
    return DrivingInputs(pose, face, bg, mask)


def load_image(path_or_array: Any) -> np.ndarray:
    if isinstance(path_or_array, (str, Path)):
        p = Path(path_or_array)
        if not p.exists():
            raise InputError(f"{p}: reference image does not exist.")
        try:
            return np.asarray(Image.open(p).convert("RGB"))
        except Exception as e:  # PIL raises several types for broken files
            raise InputError(f"{p}: not a readable image ({e}).") from e
    if isinstance(path_or_array, torch.Tensor):
        path_or_array = path_or_array.detach().cpu().numpy()
    if hasattr(path_or_array, "convert") and hasattr(path_or_array, "size"):  # a PIL image
        path_or_array = path_or_array.convert("RGB")
    arr = np.asarray(path_or_array)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(f"ref_image must be uint8 [H, W, 3] or a path, got {arr.dtype} {arr.shape}.")
    return arr


def read_video_file(path: str | Path, what: str) -> tuple[np.ndarray, float]:
    """(frames, fps) of an input video file; :class:`InputError` when missing, undecodable or empty."""
    try:
        return read_video(path)  # a missing file or a video without frames is a VideoDecodeError
    except VideoDecodeError as e:
        raise InputError(f"{what}: {e}") from None


def to_tensor_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, H, W] in [-1, 1]."""
    return frames_to_tensor(frames).unsqueeze(0)


def resize_face_video(video: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(video.shape[-2:]) == (size, size):
        return video
    return resize_frames(video, (size, size), mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------------------- pipeline

# denoise(latents, t [B], uncond) -> velocity, for one segment's conditioning
Denoiser = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


class AnimatePipeline:
    """DiT + frozen encoders. Build with :meth:`from_pretrained` or from live components. A family's
    pipeline subclasses it: ``config_class``, ``load_dit``, ``DEFAULTS`` / ``sampling_defaults``,
    ``input_videos`` / ``read_inputs`` and a ``generate`` that runs :meth:`_run_segments`."""

    config_class: type = WanAnimateConfig  # the DiT config this pipeline drives
    # the videos ``generate`` takes (``<name>_video``), in its order; the first sets the output
    input_videos: tuple[str, ...] = ("pose", "face", "bg", "mask")
    sequence_parallel = True  # ``eval.generate --sequence-parallel N`` splits its denoising steps
    DEFAULTS = dict(steps=20, guide_scale=1.0, solver="unipc", clip_len=77)  # the official sampling

    def __init__(self, dit: nn.Module, vae: WanVAE, text_encoder: TextEncoder, image_encoder: ImageEncoder, *,
                 device: torch.device | str | None = None):
        self.dit, self.vae, self.text_encoder, self.image_encoder = dit, vae, text_encoder, image_encoder
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.config = getattr(dit, "config")
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"dit.config must be a {self.config_class.__name__} for {type(self).__name__}, got "
                            f"{type(self.config).__name__}: use the pipeline of the DiT's family.")
        if text_encoder.dim != self.config.text_dim:
            raise ValueError(f"text encoder width {text_encoder.dim} != DiT text_dim {self.config.text_dim}.")
        if image_encoder.dim != self.config.image_dim:
            raise ValueError(f"image encoder width {image_encoder.dim} != DiT image_dim {self.config.image_dim}.")

    # ------------------------------------------------------------------ loading
    @staticmethod
    def detect_layout(path: str | Path) -> str:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model folder does not exist.")
        if (path / "model_index.json").exists():
            missing = [d for d in ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder")
                       if not (path / d).is_dir()]
            if missing:
                raise FileNotFoundError(f"{path}: diffusers layout lacks folders {missing}.")
            return "diffusers"
        if (path / VAE_FILE).exists():
            missing = [f for f in (T5_FILE, CLIP_FILE, "config.json") if not (path / f).exists()]
            if missing:
                raise FileNotFoundError(f"{path}: official layout lacks {missing}.")
            return "official"
        raise FileNotFoundError(
            f"{path}: neither a diffusers layout (model_index.json) nor an official layout "
            f"({VAE_FILE}); make a tiny one with `python -m wan_animate.checkpoint make-tiny DST`."
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        dit: nn.Module | None = None, encoder_dtype: torch.dtype | None = None,
                        vae_dtype: torch.dtype = torch.float32, offload: bool = False,
                        vae_tiling: bool = False) -> "AnimatePipeline":
        """Load a diffusers-layout or official-layout folder. ``dit`` replaces the folder's DiT
        (e.g. a live training model). Encoders run in ``encoder_dtype`` (default ``dtype``), the
        VAE in ``vae_dtype``; ``offload`` parks the encoders on the CPU between uses."""
        from transformers import AutoTokenizer

        path = Path(path)
        layout = cls.detect_layout(path)
        enc_kw = dict(dtype=encoder_dtype or dtype, device=device, offload=offload)
        if dit is None:
            dit = cls.load_dit(path / "transformer" if layout == "diffusers" else path, dtype=dtype, device=device)
        dit.eval()
        text_len = dit.config.text_len
        if layout == "diffusers":
            vae = WanVAE.from_pretrained(path / "vae", dtype=vae_dtype, device=device, offload=offload,
                                         tiling=vae_tiling)
            text = TextEncoder.from_pretrained(path / "text_encoder", path / "tokenizer", text_len=text_len, **enc_kw)
            image = ImageEncoder.from_pretrained(path / "image_encoder", path / "image_processor", **enc_kw)
        else:
            tok_dir = path / oe.T5_TOKENIZER_DIR
            if not tok_dir.is_dir():
                raise FileNotFoundError(f"{tok_dir}: the umT5 tokenizer folder of the official layout is missing.")
            vae = WanVAE(oe.vae_from_official(load_torch_file(path / oe.VAE_FILE)), dtype=vae_dtype,
                         device=device, offload=offload, tiling=vae_tiling)
            text = TextEncoder(oe.t5_from_official(load_torch_file(path / oe.T5_FILE)),
                               AutoTokenizer.from_pretrained(str(tok_dir)), text_len=text_len, **enc_kw)
            image = ImageEncoder(oe.clip_from_official(load_torch_file(path / oe.CLIP_FILE)), **enc_kw)
        return cls(dit, vae, text, image, device=device)

    @staticmethod
    def load_dit(path: Path, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        """The DiT of a model folder's weights (``transformer/`` or the official folder)."""
        return load_dit(path, dtype=dtype, device=device)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> list[str]:
        """Merge a LoRA file (community layout, see ``wan_animate.lora``) into the DiT with ``scale``."""
        return apply_lora(self.dit, path, scale=scale)

    # ------------------------------------------------------------------ command-line inputs
    @classmethod
    def sampling_defaults(cls, distilled: bool = False) -> dict[str, Any]:
        """``generate``'s sampling settings a command line does not give (``distilled``: the
        settings of a distilled checkpoint, where the family has one)."""
        if distilled:
            raise InputError("distilled sampling is Wan-Animate-2's; this is a Wan-Animate-14B model.")
        return dict(cls.DEFAULTS)

    @classmethod
    def read_inputs(cls, ref: str | Path, videos: dict[str, str | Path], *, clip_len: int, refert_num: int,
                    max_frames: int | None = None, target_area: int | None = None) -> tuple[dict, float]:
        """``generate``'s inputs from files (``videos``: ``input_videos`` name -> path), read and
        checked, and the driving fps. Wan-Animate-14B's streams come preprocessed (``max_frames`` and
        ``target_area`` were applied by ``data_tools.driving``)."""
        read = {k: read_video_file(p, f"{k} video" if k != "bg" else "background video") for k, p in videos.items()}
        frames = {f"{k}_video": v[0] for k, v in read.items()}
        check_inputs(**frames, clip_len=clip_len, refert_num=refert_num)
        return dict(ref_image=load_image(ref), **frames), read["pose"][1]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, ref_image: Any, pose_video: Any, face_video: Any, bg_video: Any = None,
                 mask_video: Any = None, *, prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                 steps: int = 20, shift: float = 5.0, guide_scale: float = 1.0, seed: int = 0,
                 solver: str = "unipc", clip_len: int = 77, refert_num: int = 1, progress: bool = True) -> np.ndarray:
        """Animate ``ref_image`` (uint8 [H, W, 3] or path) with driving ``pose_video`` /
        ``face_video`` (uint8 [T, H, W, 3]); replace mode with ``bg_video`` + ``mask_video``
        (1/white on the character). Returns uint8 ``[T, H, W, 3]`` with T = driving length."""
        sampling = dict(steps=steps, shift=shift, guide_scale=guide_scale, solver=solver, clip_len=clip_len,
                        refert_num=refert_num)
        check_sampling(**sampling)
        inputs = check_inputs(pose_video, face_video, bg_video, mask_video, clip_len=clip_len, refert_num=refert_num)
        face_size, replace = self.config.motion_encoder_size, inputs.mode == "replace"

        def conditioning(c: SimpleNamespace) -> Callable[[int, torch.Tensor | None], Denoiser]:
            def segment(start: int, prev: torch.Tensor | None) -> Denoiser:
                sel = c.idx[start:start + clip_len]
                pose_latents = self.vae.encode(to_tensor_video(inputs.pose[sel]).to(c.device)).to(c.dtype)
                face = resize_face_video(to_tensor_video(inputs.face[sel]), face_size).to(c.device, c.dtype)
                y = encode_condition(
                    self.vae, c.ref_pixels, clip_len=clip_len, mode=inputs.mode, prev_frames=prev,
                    bg_video=to_tensor_video(inputs.bg[sel]).to(c.device) if replace else None,
                    character_mask=torch.from_numpy(inputs.mask[sel])[None, None].to(c.device) if replace else None,
                    ref_latent=c.ref_latent).to(c.dtype)
                face_null = torch.full_like(face, -1.0) if c.cfg_on else None

                def denoise(x: torch.Tensor, t: torch.Tensor, uncond: bool) -> torch.Tensor:
                    return self.dit(x.to(c.dtype), t, c.context_null if uncond else c.context, c.clip_fea, y,
                                    pose_latents, face_null if uncond else face)

                return denoise

            return segment

        return self._run_segments(ref_image, inputs.pose, conditioning, prompt=prompt, negative_prompt=negative_prompt,
                                  seed=seed, progress=progress, **sampling)

    def _run_segments(self, ref_image: Any, driving: np.ndarray, conditioning, *, prompt: str, negative_prompt: str,
                      steps: int, shift: float, guide_scale: float, seed: int, solver: str, clip_len: int,
                      refert_num: int, progress: bool) -> np.ndarray:
        """The segment loop of every family. ``conditioning(c)`` (``c``: device, dtype, idx (the
        mirror-padded frame indices), cfg_on, context / context_null, ref_pixels, ref_latent,
        clip_fea) returns ``segment(start, prev)``: the denoiser of the segment from padded frame
        ``start`` (``prev``: the previous segment's last ``refert_num`` decoded frames, None first).
        Noise from one CPU generator seeded with ``seed``; the reference slot is never decoded."""
        real_len, height, width = driving.shape[:3]
        pe = getattr(self.dit, "patch_embedding", None)  # its weight has the compute dtype (fp32 tables aside)
        dtype = pe.weight.dtype if pe is not None and hasattr(pe, "weight") else next(self.dit.parameters()).dtype
        dev, cfg_on = self.device, guide_scale != 1.0
        ref_pixels = to_tensor_video(letterbox(load_image(ref_image), height, width)[None])[:, :, 0].to(dev)
        c = SimpleNamespace(
            device=dev, dtype=dtype, cfg_on=cfg_on, ref_pixels=ref_pixels,  # [1, 3, H, W]
            idx=mirror_indices(real_len, padded_length(real_len, clip_len, refert_num)),
            context=self.text_encoder.encode([prompt]).to(dev, dtype),
            context_null=self.text_encoder.encode([negative_prompt]).to(dev, dtype) if cfg_on else None,
            clip_fea=self.image_encoder.encode(ref_pixels).to(dev, dtype),
            ref_latent=self.vae.encode(ref_pixels.unsqueeze(2)))
        segment = conditioning(c)
        n_seg = num_segments(real_len, clip_len, refert_num)
        lat_shape = (1, self.config.out_dim, num_latent_frames(clip_len) + 1,
                     height // self.vae.spatial_stride, width // self.vae.spatial_stride)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        outputs: list[torch.Tensor] = []  # uint8 [t, H, W, 3] per segment
        prev: torch.Tensor | None = None
        seg_bar = tqdm(total=n_seg, desc="segments", disable=not progress)
        step_bar = tqdm(total=n_seg * steps, desc="steps", disable=not progress, leave=False)
        was_training = self.dit.training  # training validation passes the live model
        self.dit.eval()
        try:
            for s in range(n_seg):
                denoise = segment(s * (clip_len - refert_num), prev)
                noise = torch.randn(lat_shape, generator=generator, dtype=torch.float32).to(dev)
                latents = sample(denoise, noise, steps=steps, shift=shift, solver=solver, guide_scale=guide_scale,
                                 progress=step_bar.update)
                if not torch.isfinite(latents).all():  # would decode to a black / garbage video without a word
                    raise NonFiniteOutputError(
                        f"segment {s + 1} of {n_seg}: the denoised latents hold NaN/Inf values; nothing was written. "
                        "Check the LoRA (its alpha / scale), shift and guide_scale, or use dtype float32.")
                frames = self.vae.decode(latents[:, :, 1:])  # drop the reference slot
                prev = frames[:, :, -refert_num:].clone()  # the next segment's temporal reference
                # uint8 on the CPU right away: a 77-frame 720p segment is 0.85 GB as fp32
                outputs.append(torch.from_numpy(tensor_to_frames((frames if s == 0 else frames[:, :, refert_num:])[0])))
                seg_bar.update(1)
        finally:
            self.dit.train(was_training)
            step_bar.close()
            seg_bar.close()
        return torch.cat(outputs, dim=0)[:real_len].numpy()  # [T, H, W, 3]
