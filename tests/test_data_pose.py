"""Pose format, renderer, face boxes / crops and the vitpose backend on tiny exported ONNX models."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from data_tools.pose import PoseSequence, crop_faces, face_boxes, get_pose_backend, render_pose
from data_tools.pose.backends import (
    WHOLEBODY_FACE,
    crop_person,
    decode_detections,
    person_crop_params,
)
from data_tools.pose.render import BODY_LIMBS, LIMB_BRIGHTNESS, OPENPOSE_COLORS


# ---------------------------------------------------------------------------------------------
# format / renderer / face boxes
# ---------------------------------------------------------------------------------------------
def _pose_with(body_pts=None, face_pts=None, t=1, h=200, w=300):
    p = PoseSequence.empty(t, h, w)
    for j, (x, y) in (body_pts or {}).items():
        p.body[:, j] = (x, y, 1.0)
    if face_pts is not None:
        p.face[:, :, :2] = face_pts
        p.face[:, :, 2] = 1.0
    return p


def test_pose_roundtrip_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    p = PoseSequence(rng.random((3, 20, 3)) * 100, rng.random((3, 21, 3)), rng.random((3, 21, 3)),
                     rng.random((3, 68, 3)), 100, 200)
    q = PoseSequence.from_dict(json.loads(json.dumps(p.to_dict())))
    np.testing.assert_allclose(q.body, p.body, atol=1e-3)
    p.save_npz(tmp_path / "k.npz")
    np.testing.assert_array_equal(PoseSequence.load_npz(tmp_path / "k.npz").face, p.face)
    r = p.resized(50, 400)
    np.testing.assert_allclose(r.body[..., 0], p.body[..., 0] * 2, rtol=1e-6)
    np.testing.assert_allclose(r.body[..., 1], p.body[..., 1] * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(r.body[..., 2], p.body[..., 2])
    with pytest.raises(ValueError, match="body must be"):
        PoseSequence(np.zeros((2, 18, 3)), p.left_hand[:2], p.right_hand[:2], p.face[:2], 1, 1)


def test_render_limb_colour_threshold_and_no_face():
    # neck (1) -> right shoulder (2) is limb 0 in the palette.
    p = _pose_with({1: (100, 100), 2: (160, 100)})
    img = render_pose(p)[0]
    mid = img[100, 130]
    np.testing.assert_array_equal(mid, [int(c * LIMB_BRIGHTNESS) for c in OPENPOSE_COLORS[0]])
    assert BODY_LIMBS[0] == (1, 2)
    # joints are full-colour discs
    np.testing.assert_array_equal(img[100, 100], OPENPOSE_COLORS[1])
    # below the 0.5 score threshold nothing is drawn
    p.body[:, 2, 2] = 0.49
    assert render_pose(p)[0][100, 130].max() == 0
    # face landmarks alone draw nothing
    face_only = _pose_with(face_pts=np.stack(np.meshgrid(np.linspace(50, 90, 17), [60, 70, 80, 90])[::1], -1)
                           .reshape(-1, 2)[:68])
    assert render_pose(face_only).max() == 0
    # rendering on another size rescales the keypoints
    big = render_pose(_pose_with({1: (100, 100), 2: (160, 100)}), 400, 600)[0]
    assert big[200, 260].max() > 0 and big[100, 130].max() == 0


def test_render_feet_limbs_replace_shoulder_ear_limbs():
    # Wan-Animate's 19 limbs end with ankle -> toe (l_ankle 13 -> l_toe 18, r_ankle 10 -> r_toe 19),
    # not OpenPose's shoulder -> ear; toe colours (200, 200, 0) / (100, 100, 0).
    assert BODY_LIMBS[17:] == ((13, 18), (10, 19))
    p = _pose_with({13: (100, 100), 18: (160, 100), 10: (100, 150), 19: (160, 150),
                    2: (100, 30), 16: (160, 30)})
    img = render_pose(p)[0]
    np.testing.assert_array_equal(img[100, 130], [153, 0, 51])  # 0.6 * (255, 0, 85), limb 17
    np.testing.assert_array_equal(img[150, 130], [120, 120, 0])  # 0.6 * (200, 200, 0), limb 18
    np.testing.assert_array_equal(img[100, 160], [200, 200, 0])  # l_toe disc, full colour
    np.testing.assert_array_equal(img[150, 160], [100, 100, 0])  # r_toe disc
    assert img[30, 130].max() == 0  # shoulder -> ear is not a limb


def test_render_hands_and_stick_width():
    from data_tools.pose.render import stick_width

    # max(int(min(H, W) / 200) - 1, 1)
    assert (stick_width(720, 1280), stick_width(1080, 1920), stick_width(200, 300)) == (2, 4, 1)
    p = _pose_with()
    p.left_hand[:, 0] = (50, 100, 1.0)
    p.left_hand[:, 1] = (90, 100, 1.0)  # edge 0 (0 -> 1): hue 0 -> red
    p.left_hand[:, 5] = (50, 150, 1.0)  # edge 4 (0 -> 5): hue 4/20 -> (0.8, 1, 0) * 255
    img = render_pose(p)[0]
    np.testing.assert_array_equal(img[100, 70], [255, 0, 0])
    np.testing.assert_array_equal(img[125, 50], [204, 255, 0])
    assert img[102, 70].max() == 0 and img[125, 52].max() == 0  # 1 px edges
    np.testing.assert_array_equal(img[100, 90], [0, 0, 255])  # keypoints are blue dots
    p.left_hand[:, 5, 2] = 0.49  # below the threshold: no edge
    assert render_pose(p)[0][125, 50].max() == 0


# An independent reference written from the official renderer's rules (Wan2.2
# wan/modules/animate/preprocess/human_visualization.py, draw_aapose_new + draw_handpose_new with
# stickwidth_type "v2", as process_pipepline.py calls it): numpy arithmetic on the keypoint arrays,
# matplotlib float hues handed to cv2. ``hand_width`` / ``edge_rule`` switch rules off for the
# negative controls.
_OFFICIAL_LIMBS_1BASED = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
                          (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (14, 19), (11, 20))
_OFFICIAL_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
                    (200, 200, 0), (100, 100, 0))


def _official_rules_frame(body, lhand, rhand, h, w, threshold=0.5, hand_width=None, edge_rule=True):
    import math

    import cv2
    from matplotlib.colors import hsv_to_rgb

    img = np.zeros((h, w, 3), np.uint8)
    sw = max(int(min(h, w) / 200) - 1, 1)
    for (i1, i2), color in zip(_OFFICIAL_LIMBS_1BASED, _OFFICIAL_COLORS):
        k1, k2 = body[i1 - 1], body[i2 - 1]
        if k1[-1] < threshold or k2[-1] < threshold:
            continue
        xs, ys = np.array([k1[0], k2[0]]), np.array([k1[1], k2[1]])
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), sw), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(img, poly, [int(float(c) * 0.6) for c in color])
    for k, color in zip(body, _OFFICIAL_COLORS):
        if k[-1] >= threshold:
            cv2.circle(img, (int(k[0]), int(k[1])), sw, color, thickness=-1)
    hw = max(max(int(min(h, w) / 200) - 1, 1) // 2, 1) if hand_width is None else hand_width
    edges = [(0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4)]
    inside = (lambda *v: all(c > 0.01 for c in v)) if edge_rule else (lambda *v: True)
    for hand in (lhand, rhand):
        for ie, (e1, e2) in enumerate(edges):
            k1, k2 = hand[e1], hand[e2]
            if k1[2] < threshold or k2[2] < threshold:
                continue
            x1, y1, x2, y2 = int(k1[0]), int(k1[1]), int(k2[0]), int(k2[1])
            if inside(x1, y1, x2, y2):
                cv2.line(img, (x1, y1), (x2, y2), hsv_to_rgb([ie / float(len(edges)), 1.0, 1.0]) * 255, thickness=hw)
        for k in hand:
            if k[2] >= threshold and inside(int(k[0]), int(k[1])):
                cv2.circle(img, (int(k[0]), int(k[1])), hw, (0, 0, 255), thickness=-1)
    return img


def _edge_heavy_pose(t, h, w, seed):
    """Random keypoints with many on / just inside / just outside the canvas edges, scores
    around the threshold, fractional coordinates."""
    rng = np.random.default_rng(seed)
    seq = PoseSequence.empty(t, h, w)
    specials = np.array([-1.5, -0.5, 0.0, 0.4, 0.99, 1.0, 1.5])
    for arr in (seq.body, seq.left_hand, seq.right_hand, seq.face):
        n = arr.shape[1]
        arr[..., 0] = rng.uniform(-5, w + 5, (t, n))
        arr[..., 1] = rng.uniform(-5, h + 5, (t, n))
        for c, size in ((0, w), (1, h)):
            pick = rng.random((t, n)) < 0.3
            edge = rng.choice(np.concatenate([specials, size - 1 + specials]), (t, n))
            arr[..., c] = np.where(pick, edge, arr[..., c])
        arr[..., 2] = rng.choice([0.0, 0.49, 0.5, 0.9, 1.0], (t, n), p=[0.1, 0.1, 0.1, 0.3, 0.4])
    # Hands near the origin too: the official edge rule matters most there.
    seq.right_hand[: t // 2, :, :2] = rng.uniform(-2, 30, (t // 2, 21, 2))
    return PoseSequence(seq.body, seq.left_hand, seq.right_hand, seq.face, h, w)


@pytest.mark.parametrize("h,w,t", [(480, 832, 24), (1080, 1920, 8)])
def test_render_bit_identical_to_official_rules(h, w, t):
    seq = _edge_heavy_pose(t, h, w, seed=h)
    ours = render_pose(seq)  # face landmarks are in seq; the official renderer ignores them too
    ref = np.stack([_official_rules_frame(seq.body[i], seq.left_hand[i], seq.right_hand[i], h, w) for i in range(t)])
    assert ref.max() > 0
    np.testing.assert_array_equal(ours, ref)
    # Negative controls: the reference must see a 1-pixel hand line and drawing edge points.
    no_edge_rule = np.stack([_official_rules_frame(seq.body[i], seq.left_hand[i], seq.right_hand[i], h, w,
                                                   edge_rule=False) for i in range(t)])
    assert (no_edge_rule != ours).any()
    if h >= 1000:
        thin = np.stack([_official_rules_frame(seq.body[i], seq.left_hand[i], seq.right_hand[i], h, w,
                                               hand_width=1) for i in range(t)])
        assert (thin != ours).any()


def test_render_hand_edge_rule_and_1080p_width():
    from data_tools.pose.render import hand_stick_width, render_frame

    assert (hand_stick_width(480, 832), hand_stick_width(720, 1280), hand_stick_width(1080, 1920)) == (1, 1, 2)
    body, lh, rh = np.zeros((20, 3), np.float32), np.zeros((21, 3), np.float32), np.zeros((21, 3), np.float32)
    lh[0], lh[1] = (0.5, 40, 1.0), (40, 40, 1.0)  # int(x) == 0: point and its edge are not drawn
    lh[5], lh[6] = (60, 60, 1.0), (90, 60, 1.0)  # an ordinary edge, 2 px thick at 1080p
    img = render_frame(body, lh, rh, 1080, 1920)
    assert img[:, :30].max() == 0 and img[40, 20].max() == 0
    assert img[60, 75].max() > 0 and img[61, 75].max() > 0 and img[63, 75].max() == 0
    lh[0, 0] = 1.0  # x == 1 is drawn
    assert render_frame(body, lh, rh, 1080, 1920)[40, 20].max() > 0


def test_face_box_official_rule():
    xs, ys = np.meshgrid(np.linspace(100, 200, 17), np.linspace(50, 130, 4))
    pts = np.stack([xs.ravel(), ys.ravel()], -1)[:68]
    p = _pose_with(face_pts=pts, h=400, w=400)
    box = face_boxes(p, smooth_window=1)[0]
    w0, h0 = 100.0, 80.0
    dw = (w0 * np.sqrt(1.3) - w0) / 2
    dh = (h0 * np.sqrt(1.3) - h0) / 4
    np.testing.assert_allclose(box, [100 - dw, 50 - 3 * dh, 200 + dw, 130 + dh], atol=1e-3)
    # clipped to the frame
    edge = _pose_with(face_pts=pts - [97, 48], h=400, w=400)
    b = face_boxes(edge, smooth_window=1)[0]
    assert b[0] == 0 and b[1] == 0


def test_face_box_smoothing_reduces_jitter_and_fills_gaps():
    rng = np.random.default_rng(1)
    base = np.stack(np.meshgrid(np.linspace(100, 160, 17), np.linspace(100, 170, 4)), -1).reshape(-1, 2)[:68]
    t = 40
    p = PoseSequence.empty(t, 480, 640)
    p.face[:, :, :2] = base + rng.normal(0, 3, (t, 1, 2))
    p.face[:, :, 2] = 1
    p.face[10:13, :, 2] = 0  # a gap without landmarks and without head points
    raw, src = face_boxes(p, smooth_window=1, return_source=True)
    smooth = face_boxes(p, smooth_window=7)
    jitter = lambda b: np.abs(np.diff((b[:, :2] + b[:, 2:]) / 2, axis=0)).mean()  # noqa: E731
    assert jitter(smooth) < 0.6 * jitter(raw)
    assert (src[10:13] == 0).all() and (src[:10] == 2).all()
    assert np.isfinite(raw).all()


def test_crop_faces_takes_the_box():
    frames = np.zeros((2, 100, 120, 3), np.uint8)
    frames[:, 20:60, 30:70] = 200
    boxes = np.array([[30, 20, 70, 60]] * 2, np.float32)
    crops, out_boxes = crop_faces(frames, PoseSequence.empty(2, 100, 120), 64, boxes=boxes)
    assert crops.shape == (2, 64, 64, 3) and crops.min() == 200
    np.testing.assert_array_equal(out_boxes, boxes)


# ---------------------------------------------------------------------------------------------
# vitpose on tiny exported ONNX models with the official input/output signatures
# ---------------------------------------------------------------------------------------------
def _constant_model(path, in_name, in_shape, out_name, out_shape, const, dynamic_batch=False):
    """An ONNX graph out = const + 0 * mean(input): the official I/O signature, known output."""
    batch = "N" if dynamic_batch else in_shape[0]
    x = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, *in_shape[1:]])
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, *out_shape[1:]])
    nodes = [
        helper.make_node("ReduceMean", [in_name], ["m"], keepdims=1, axes=[1, 2, 3]),
        helper.make_node("Mul", ["m", "zero"], ["mz"]),
        helper.make_node("Add", ["mz", "c"], [out_name]),
    ]
    inits = [numpy_helper.from_array(np.zeros((1, 1, 1, 1) if len(out_shape) == 4 else (1, 1, 1), np.float32),
                                     "zero"),
             numpy_helper.from_array(const.astype(np.float32), "c")]
    if len(out_shape) == 3:
        nodes[0] = helper.make_node("ReduceMean", [in_name], ["m4"], keepdims=1, axes=[1, 2, 3])
        nodes.insert(1, helper.make_node("Squeeze", ["m4", "ax"], ["m"]))
        inits.append(numpy_helper.from_array(np.array([3], np.int64), "ax"))
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _gaussian_heatmaps(peaks, h=64, w=48, sigma=2.0):
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma ** 2)) for px, py in peaks])


@pytest.fixture
def tiny_vitpose(tmp_path):
    det = np.zeros((1, 300, 6), np.float32)
    det[0, 0] = [200, 120, 360, 560, 0.9, 0]  # the person (640x640 input space)
    det[0, 1] = [220, 140, 340, 500, 0.6, 0]  # overlapping duplicate, removed by NMS
    det[0, 2] = [0, 0, 640, 640, 0.95, 2]  # a car covering everything: not a person
    det[0, 3] = [500, 500, 520, 540, 0.04, 0]  # below conf 0.05
    _constant_model(tmp_path / "yolov10m.onnx", "images", [1, 3, 640, 640], "output0", [1, 300, 6], det)
    rng = np.random.default_rng(0)
    peaks = np.stack([rng.uniform(4, 43, 133), rng.uniform(4, 59, 133)], 1)
    heat = _gaussian_heatmaps(peaks)[None]
    pose_dir = tmp_path / "vitpose_h_wholebody.onnx"  # the official checkpoint is a folder
    pose_dir.mkdir()
    _constant_model(pose_dir / "end2end.onnx", "input", [1, 3, 256, 192], "heatmaps", [1, 133, 64, 48], heat,
                    dynamic_batch=True)
    return tmp_path / "yolov10m.onnx", pose_dir, peaks


def test_vitpose_end_to_end_on_tiny_onnx(tiny_vitpose):
    det_path, pose_path, peaks = tiny_vitpose
    frames = np.random.default_rng(1).integers(0, 255, (3, 360, 480, 3), dtype=np.uint8)
    backend = get_pose_backend("vitpose", detector_path=str(det_path), pose_path=str(pose_path), batch_size=2)
    pose = backend.extract(frames)
    assert len(pose) == 3 and (pose.height, pose.width) == (360, 480)
    assert backend.last_detected.all()
    # Expected: the person box mapped to the frame, grown to 192:256 and x1.25, heatmap -> frame.
    box = np.array([200 * 480 / 640, 120 * 360 / 640, 360 * 480 / 640, 560 * 360 / 640])
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    size = max((box[2] - box[0]) * 256 / 192, box[3] - box[1]) * 1.25
    cw, ch = size * 192 / 256, size
    expect = np.stack([peaks[:, 0] * cw / 48 + cx - cw / 2, peaks[:, 1] * ch / 64 + cy - ch / 2], 1)
    got_face = pose.face[0, :, :2]
    # Sub-pixel (DARK) decoding recovers non-integer peaks to well under one heatmap cell.
    cell = cw / 48
    err = np.abs(got_face - expect[WHOLEBODY_FACE]).max()
    assert err < 0.2 * cell, (err, cell)
    # Plain arg-max would be off by up to half a cell: the refinement matters.
    argmax_err = np.abs(np.round(peaks[WHOLEBODY_FACE]) - peaks[WHOLEBODY_FACE]).max() * cell
    assert err < argmax_err
    # Body mapping: neck is the shoulder mean, toes the mean of two toe points.
    np.testing.assert_allclose(pose.body[0, 1, :2], (expect[5] + expect[6]) / 2, atol=0.3 * cell)
    np.testing.assert_allclose(pose.body[0, 18, :2], (expect[17] + expect[18]) / 2, atol=0.3 * cell)
    np.testing.assert_allclose(pose.left_hand[0, :, :2], expect[91:112], atol=0.3 * cell)
    assert (pose.body[..., 2] > 0.9).all()  # heatmap maxima are ~1


def test_vitpose_without_person_falls_back_to_full_frame(tmp_path):
    det = np.zeros((1, 300, 6), np.float32)
    det[0, 0] = [0, 0, 640, 640, 0.95, 2]  # only a non-person
    _constant_model(tmp_path / "det.onnx", "images", [1, 3, 640, 640], "output0", [1, 300, 6], det)
    heat = _gaussian_heatmaps(np.full((133, 2), [24.0, 32.0]))[None]
    _constant_model(tmp_path / "pose.onnx", "input", [1, 3, 256, 192], "heatmaps", [1, 133, 64, 48], heat,
                    dynamic_batch=True)
    backend = get_pose_backend("vitpose", detector_path=str(tmp_path / "det.onnx"), pose_path=str(tmp_path / "pose.onnx"))
    pose = backend.extract(np.zeros((1, 200, 300, 3), np.uint8))
    assert not backend.last_detected.any()
    # heatmap centre -> crop centre -> frame centre
    np.testing.assert_allclose(pose.body[0, 0, :2], [150, 100], atol=1.0)


def test_detection_decoding_and_crop_geometry():
    out = np.zeros((1, 5, 6), np.float32)
    out[0, 0] = [10, 10, 110, 310, 0.5, 0]
    out[0, 1] = [300, 300, 330, 330, 0.9, 0]  # higher score but smaller: the largest box wins
    box = decode_detections(out, (640, 640), (640, 640))
    np.testing.assert_allclose(box[:4], [10, 10, 110, 310])
    assert decode_detections(np.zeros((1, 5, 6), np.float32), (640, 640), (640, 640)) is None
    # crop: a marker at the crop centre lands at the model input's centre
    frame = np.zeros((300, 400, 3), np.uint8)
    frame[148:153, 198:203] = 255
    c, wh = person_crop_params(np.array([150, 50, 250, 250]))
    np.testing.assert_allclose(c, [200, 150])
    np.testing.assert_allclose(wh[1] / wh[0], 256 / 192)
    x = crop_person(frame, c, wh)
    assert x.shape == (3, 256, 192)
    peak = np.unravel_index(x[0].argmax(), x[0].shape)
    assert abs(peak[0] - 128) <= 3 and abs(peak[1] - 96) <= 3


def _greedy_nms_reference(boxes, scores, iou):
    """The hand-written NMS the backend used before cv2.dnn.NMSBoxes, as a reference."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(int(i))
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        order = rest[inter / np.maximum(area(boxes[i]) + area(boxes[rest]) - inter, 1e-9) <= iou]
    return keep


def test_nms_is_opencv_and_matches_the_old_greedy_nms():
    from data_tools.pose.backends import nms_boxes

    rng = np.random.default_rng(0)
    compared = 0
    for trial in range(200):
        n = int(rng.integers(1, 40))
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(5, 150, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = rng.permutation(n).astype(np.float32) / n + 0.05  # distinct scores: a unique order
        for iou in (0.3, 0.5, 0.7):
            ours = nms_boxes(boxes, scores, iou).tolist()
            assert ours == _greedy_nms_reference(boxes, scores, iou), (trial, iou)
            compared += len(ours) < n  # something was suppressed
    assert compared > 100
    assert nms_boxes(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []
    # negative control: two heavily overlapping boxes keep only the better one; apart, both.
    two = np.array([[0, 0, 100, 100], [5, 5, 105, 105]], np.float32)
    assert nms_boxes(two, np.array([0.5, 0.9], np.float32), 0.5).tolist() == [1]
    assert nms_boxes(two + [[0, 0, 0, 0], [200, 200, 200, 200]], np.array([0.5, 0.9], np.float32), 0.5).tolist() == [1, 0]


def test_mediapipe_native_log_lines_stay_out_of_the_terminal(capfd):
    import os

    from data_tools.pose.quiet import NOISE, native_stderr_filtered
    from data_tools.segment import get_segmenter

    frames = (np.random.default_rng(0).random((2, 96, 96, 3)) * 255).astype(np.uint8)
    get_pose_backend("mediapipe").extract(frames)
    seg = get_segmenter("mediapipe")
    seg.masks(frames)
    seg.close()
    err = capfd.readouterr().err
    assert "inference_feedback_manager" not in err and "TensorFlow Lite" not in err, err
    # negative control: what the filter drops is exactly the noise; errors and unknown lines pass.
    with native_stderr_filtered():
        os.write(2, b"W0000 00:00:1796131872.238287    8222 x.cc:114] noise\nE0000 00:00:1.5 7 y.cc:3] real\nplain\n")
    assert capfd.readouterr().err == "E0000 00:00:1.5 7 y.cc:3] real\nplain\n"
    assert NOISE.match("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")


def test_backend_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown pose backend"):
        get_pose_backend("openpose")
    with pytest.raises(Exception, match="pose_path"):
        get_pose_backend("vitpose")
    with pytest.raises(Exception, match="not found"):
        get_pose_backend("vitpose", pose_path=str(tmp_path / "missing.onnx"))
    with pytest.raises(TypeError, match="unknown mediapipe backend options"):
        get_pose_backend("mediapipe", max_sid=3)


def test_precomputed_backend(tmp_path):
    rng = np.random.default_rng(0)
    p = PoseSequence(rng.random((10, 20, 3)) * 50, rng.random((10, 21, 3)), rng.random((10, 21, 3)),
                     rng.random((10, 68, 3)), 100, 200)
    (tmp_path / "kp").mkdir()
    p.save_npz(tmp_path / "kp" / "clip.npz")
    backend = get_pose_backend("precomputed", path=str(tmp_path / "kp"))
    frames = np.zeros((4, 50, 100, 3), np.uint8)
    out = backend.extract(frames, source="/videos/clip.mp4", frame_indices=[0, 2, 4, 6])
    np.testing.assert_allclose(out.body[1, :, 0], p.body[2, :, 0] * 0.5, rtol=1e-5)
    with pytest.raises(Exception, match="frames"):
        backend.extract(frames, source="/videos/clip.mp4")
    with pytest.raises(Exception, match="no precomputed keypoints"):
        backend.extract(frames, source="/videos/other.mp4")
