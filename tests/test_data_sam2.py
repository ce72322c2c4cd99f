"""SAM2 replace-mode masks on a tiny random Sam2VideoModel: prompts from the pose, propagation over
every frame, mask post-processing, bad folders, config validation, prepare + preprocess_driving."""

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from transformers import Sam2VideoConfig, Sam2VideoInferenceSession, Sam2VideoModel

from data_tools.config import PrepareConfig
from data_tools.pose.format import PoseSequence
from data_tools.segment import SAM2_PROMPT_JOINTS, CharacterSegmenter, Sam2Segmenter, get_segmenter

S = 64  # model input size; the lowest feature map is S/16 = 4x4


# ---------------------------------------------------------------------------------------------
# a tiny random SAM2 folder + spies
# ---------------------------------------------------------------------------------------------
def tiny_sam2_config() -> Sam2VideoConfig:
    # transformers' memory attention hard-codes 64-dim memories (kv_in_dim=64) and splits object
    # pointers only when the hidden size is larger than that, so hidden = 128, memory = 64.
    hiera = dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[S, S],
                 blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                 num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[2, 2, 2, 2],
                 global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
    vision = dict(model_type="sam2_vision_model", backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                  backbone_feature_sizes=[[S // 4] * 2, [S // 8] * 2, [S // 16] * 2], fpn_hidden_size=128)
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=128, image_size=S, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=128, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        image_size=S, num_maskmem=3, memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[S // 16] * 2,
        memory_encoder_hidden_size=128, memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
        memory_fuser_num_layers=1, memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64,
        max_object_pointers_in_encoder=4)


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam2_tiny")
    torch.manual_seed(0)
    Sam2VideoModel(tiny_sam2_config()).save_pretrained(d)
    return d


class Spy:
    """Records the prompts handed to the SAM2 session and the frames the model ran on; with
    ``logits`` set, replaces the model's mask logits so the post-processing can be checked."""

    def __init__(self, monkeypatch, logits=None):
        self.prompts: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.frames: list[int] = []
        add, fwd = Sam2VideoInferenceSession.add_point_inputs, Sam2VideoModel.forward
        spy = self

        def add_point_inputs(session, obj_idx, frame_idx, inputs):
            spy.prompts.append((frame_idx, inputs["point_coords"].numpy().copy(),
                                inputs["point_labels"].numpy().copy()))
            return add(session, obj_idx, frame_idx, inputs)

        def forward(model, inference_session, frame_idx=None, **kw):
            out = fwd(model, inference_session, frame_idx=frame_idx, **kw)
            spy.frames.append(out.frame_idx)
            if logits is not None:
                out.pred_masks = logits(out.pred_masks)
            return out

        monkeypatch.setattr(Sam2VideoInferenceSession, "add_point_inputs", add_point_inputs)
        monkeypatch.setattr(Sam2VideoModel, "forward", forward)


def left_half(pred):
    """Logits +10 on the left half of the low-res mask, -10 elsewhere."""
    lo = torch.full_like(pred, -10.0)
    lo[..., : pred.shape[-1] // 2] = 10.0
    return lo


def person_pose(t, h, w, present) -> PoseSequence:
    """A standing figure: 20 body points spread over the middle of the frame on ``present`` frames."""
    pose = PoseSequence.empty(t, h, w)
    ys = np.linspace(0.15 * h, 0.9 * h, 20)
    for k in present:
        pose.body[k, :, 0] = w * 0.4 + np.arange(20) % 3 + k  # moves right one pixel per frame
        pose.body[k, :, 1] = ys
        pose.body[k, :, 2] = 0.9
    return pose


# ---------------------------------------------------------------------------------------------
# the segmenter
# ---------------------------------------------------------------------------------------------
def test_sam2_prompts_from_pose_and_propagation_over_every_frame(sam2_dir, monkeypatch):
    t, h, w = 6, 48, 80
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8)
    pose = person_pose(t, h, w, present=range(2, t))
    pose.body[4, 0, 2] = 0.2  # frame 4's nose is not confident: no click there
    spy = Spy(monkeypatch)
    seg = get_segmenter("sam2", path=str(sam2_dir), keyframes=3)
    assert isinstance(seg, Sam2Segmenter) and seg.image_size == S
    masks = seg.masks(frames, pose=pose)
    assert masks.shape == (t, h, w) and masks.dtype == bool
    # keyframes: 3 of the person frames 2..5, spread evenly -> 2, 4 (rounded from 3.5) and 5
    assert [p[0] for p in spy.prompts] == [2, 4, 5]
    for k, coords, labels in spy.prompts:
        joints = [j for j in SAM2_PROMPT_JOINTS if not (k == 4 and j == 0)]
        want = pose.body[k, joints, :2] * [S / w, S / h]  # model-input pixels
        np.testing.assert_allclose(coords[0, 0], want, rtol=1e-5)
        assert labels.tolist() == [[[1] * len(joints)]]
    # every frame was segmented, frames 0-1 by propagating backward from the first keyframe
    assert set(spy.frames) == set(range(t))
    # negative control: a different pose gives different clicks
    spy.prompts.clear()
    seg.masks(frames, pose=person_pose(t, h, w, present=range(t)))
    assert [p[0] for p in spy.prompts] == [0, 2, 5]


@pytest.mark.slow  # ~13 CPU s on 2 cores
def test_sam2_mask_is_model_logits_above_zero_at_frame_size(sam2_dir, monkeypatch):
    t, h, w = 5, 48, 80
    frames = np.full((t, h, w, 3), 100, np.uint8)
    Spy(monkeypatch, logits=left_half)
    seg = Sam2Segmenter(sam2_dir, dilate=0)
    masks = seg.masks(frames, pose=person_pose(t, h, w, present=range(t)))
    want = np.zeros((h, w), bool)
    want[:, : w // 2] = True
    assert (masks == want).all()
    # bf16 (the CUDA default) runs the same path
    half = Sam2Segmenter(sam2_dir, dtype="bf16").masks(frames, pose=person_pose(t, h, w, present=range(t)))
    assert (half == want).all()
    grown = Sam2Segmenter(sam2_dir, dilate=2).masks(frames, pose=person_pose(t, h, w, present=range(t)))
    assert grown[:, :, : w // 2 + 2].all() and not grown[:, :, w // 2 + 2:].any()


def test_sam2_box_prompt_and_chunks_without_person(sam2_dir, monkeypatch):
    t, h, w = 6, 48, 80
    frames = np.random.default_rng(1).integers(0, 255, (t, h, w, 3), dtype=np.uint8)
    pose = person_pose(t, h, w, present=range(3, t))
    spy = Spy(monkeypatch, logits=left_half)
    seg = Sam2Segmenter(sam2_dir, prompt="both", keyframes=1, chunk_len=3, box_margin=0.1)
    with pytest.warns(UserWarning, match="3 of 6 frames"):
        masks = seg.masks(frames, pose=pose)
    # chunk 0..2 has nobody: no prompt, no model call, empty masks, counted
    assert not masks[:3].any() and masks[3:, :, : w // 2].all() and seg.frames_without_prompt == 3
    assert [p[0] for p in spy.prompts] == [0] and min(spy.frames) == 0 and set(spy.frames) == {0, 1, 2}
    _, coords, labels = spy.prompts[0]
    assert labels[0, 0, :2].tolist() == [2, 3] and (labels[0, 0, 2:] == 1).all()
    pts = pose.body[3, :, :2]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    mx, my = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
    box = np.array([[x0 - mx, y0 - my], [min(x1 + mx, w - 1), min(y1 + my, h - 1)]]) * [S / w, S / h]
    np.testing.assert_allclose(coords[0, 0, :2], box, rtol=1e-5)


def test_sam2_needs_the_pose_and_a_sam2_folder(tmp_path, sam2_dir):
    seg = Sam2Segmenter(sam2_dir)
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="pose"):
        seg.masks(frames)
    with pytest.raises(ValueError, match="3 frames, the video 2"):
        seg.masks(frames, pose=PoseSequence.empty(3, 32, 32))
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*transformers format"):
        get_segmenter("sam2", path=str(missing))
    with pytest.raises(ValueError, match="sam2_path=DIR"):
        get_segmenter("sam2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}.*no config.json"):
        Sam2Segmenter(empty)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'.*sam2_video"):
        Sam2Segmenter(other)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(sam2_dir) / "config.json").read_text())
    with pytest.raises(ValueError, match="weights do not load"):
        Sam2Segmenter(no_weights)
    # an incomplete checkpoint (here: no video memory) is refused, not filled with random weights
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((Path(sam2_dir) / "config.json").read_text())
    weights = load_file(Path(sam2_dir) / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("memory_attention")},
              partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights are missing.*memory_attention"):
        Sam2Segmenter(partial)
    with pytest.raises(ValueError, match="prompt="):
        Sam2Segmenter(sam2_dir, prompt="scribble")
    with pytest.raises(ValueError, match="segmenter='grabcut'"):
        get_segmenter("grabcut")


def test_sam2_normalisation_from_the_preprocessor_config(tmp_path, sam2_dir):
    import shutil

    assert Sam2Segmenter(sam2_dir)._mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    d = tmp_path / "sam2"
    shutil.copytree(sam2_dir, d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    seg = Sam2Segmenter(d)
    x = seg._pixels(np.full((1, 8, 8, 3), 255, np.uint8))
    assert x.shape == (1, 3, S, S) and torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="set sam2_path="):
        PrepareConfig(input="a", output="b", replace=True, segmenter="sam2")
    with pytest.raises(ValueError, match="segmenter='sam3'"):
        PrepareConfig(input="a", output="b", replace=True, segmenter="sam3")
    with pytest.raises(ValueError, match="replace=true"):
        PrepareConfig(input="a", output="b", segmenter="sam2", sam2_path="x")
    with pytest.raises(ValueError, match="pose_options.path"):
        PrepareConfig(input="a", output="b", replace=True, segmenter="sam2", sam2_path="x",
                      pose_backend="precomputed", pose_options={"videos": "v"})
    cfg = PrepareConfig(input="a", output="b", replace=True, segmenter="sam2", sam2_path="x")
    assert cfg.segmenter == "sam2" and PrepareConfig(input="a", output="b").segmenter == "mediapipe"


def test_mediapipe_segmenter_keeps_its_interface():
    seg = get_segmenter("mediapipe", threshold=0.5)
    assert isinstance(seg, CharacterSegmenter)
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    a, b = seg.masks(frames), seg.masks(frames, pose=PoseSequence.empty(2, 32, 32))
    assert a.shape == (2, 32, 32) and a.dtype == bool and (a == b).all()
    seg.close()


# ---------------------------------------------------------------------------------------------
# prepare + preprocess_driving with segmenter=sam2
# ---------------------------------------------------------------------------------------------
def _person_video(tmp_path, t=9, h=64, w=96):
    from wan_animate.video_io import write_video

    frames = np.full((t, h, w, 3), 60, np.uint8)
    for k in range(t):
        frames[k, 8:60, 30 + k: 50 + k] = (200, 120, 80)
    video = tmp_path / "clip.mp4"
    write_video(video, frames, 30.0)
    pose = person_pose(t, h, w, present=range(t))
    pose.save_npz(tmp_path / "clip.npz")
    return video, pose


def test_prepare_with_sam2_writes_mask_and_background(tmp_path, sam2_dir, monkeypatch):
    from wan_animate.samples import decode_sample
    from data_tools.prepare import prepare
    from wan_animate.samples import list_shards, read_shard
    from wan_animate.video_io import read_video

    video, pose = _person_video(tmp_path)
    spy = Spy(monkeypatch, logits=left_half)
    cfg = PrepareConfig(input=str(video), output=str(tmp_path / "out"), workers=0, fps=-1, clip_len=9,
                        target_area=64 * 96, face_size=32, reference_policy="first", replace=True,
                        pose_backend="precomputed", pose_options={"path": str(tmp_path / "clip.npz")},
                        segmenter="sam2", sam2_path=str(sam2_dir), segmenter_options={"keyframes": 2})
    m = prepare(cfg, progress=False)
    assert m["counts"]["clips_written"] == 1, m
    raw = [r for p in list_shards(tmp_path / "out") for r in read_shard(p)]
    assert len(raw) == 1
    d = decode_sample(raw[0])
    _, t, h, w = d["video"].shape
    assert (h, w) == (64, 96) and d["mask"].shape == (1, t, h, w)
    # the mask is SAM2's (left half), stored as 0/255 video; the background blanks it out
    mask_video = read_video(raw[0]["mask.mp4"])[0]
    assert mask_video.shape[:3] == (t, h, w)
    assert np.minimum(mask_video, 255 - mask_video.astype(int)).mean() < 3  # ~only 0 and 255
    assert (mask_video[:, :, : w // 2 - 2] > 200).all() and (mask_video[:, :, w // 2 + 2:] < 50).all()
    assert (d["bg"][:, :, :, : w // 2 - 2] < -0.9).all() and (d["bg"][:, :, :, w // 2 + 2:] > -0.9).any()
    # the clicks were the clip's keypoints (crop plan is identity here) in model-input pixels
    assert [p[0] for p in spy.prompts] == [0, 8]
    np.testing.assert_allclose(spy.prompts[1][1][0, 0],
                               pose.body[8, list(SAM2_PROMPT_JOINTS), :2] * [S / w, S / h], atol=0.02)


def test_preprocess_driving_with_sam2(tmp_path, sam2_dir, monkeypatch):
    from data_tools.preprocess_driving import main
    from wan_animate.video_io import read_video

    video, _ = _person_video(tmp_path)
    cv2.imwrite(str(tmp_path / "ref.png"), np.full((64, 48, 3), 128, np.uint8))
    spy = Spy(monkeypatch, logits=left_half)
    out = tmp_path / "drv"
    rc = main(["--video", str(video), "--ref", str(tmp_path / "ref.png"), "--out", str(out), "--replace",
               "--segmenter", "sam2", "--sam2-path", str(sam2_dir), "--pose-backend", "precomputed",
               "--pose-option", f"path={tmp_path / 'clip.npz'}", "--fps", "-1", "--target-area", str(64 * 96),
               "--face-size", "32"])
    assert rc == 0 and spy.prompts
    mask, _ = read_video(out / "src_mask.mp4")
    assert mask.shape[1:3] == (64, 96) and (mask[:, :, :46] > 200).all() and (mask[:, :, 50:] < 50).all()
    assert json.loads((out / "src_meta.json").read_text())["segmenter"] == "sam2"
    with warnings.catch_warnings():  # sam2 without --sam2-path: a usage error, one line, exit status 2
        warnings.simplefilter("ignore")
        assert main(["--video", str(video), "--ref", "r.png", "--out", str(out), "--replace", "--segmenter", "sam2"]) == 2
