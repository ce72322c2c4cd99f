"""Evaluation metrics. Every function takes plain arrays (uint8 videos ``[T, H, W, 3]``,
``PoseSequence`` keypoints) so it can be used outside ``eval/main.py`` too."""

from eval.metrics.fvd import FVDError, frechet_distance, fvd, i3d_features, load_i3d
from eval.metrics.identity import identity_similarity
from eval.metrics.image import psnr, ssim, ssim_per_frame
from eval.metrics.keypoints import expression_metrics, motion_metrics
from eval.metrics.lpips import LPIPS, LPIPSError
from eval.metrics.temporal import flicker, temporal_error
