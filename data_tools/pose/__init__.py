"""Keypoints, pose backends, the pose renderer and the face cropper."""

from data_tools.pose.backends import (
    BACKENDS,
    PoseBackend,
    PoseBackendError,
    get_pose_backend,
    load_keypoints,
    wholebody_to_pose,
)
from data_tools.pose.face import crop_faces, face_boxes, official_face_box
from data_tools.pose.format import PoseSequence
from data_tools.pose.render import render_frame, render_pose

__all__ = [
    "BACKENDS", "PoseBackend", "PoseBackendError", "PoseSequence", "crop_faces", "face_boxes",
    "get_pose_backend", "load_keypoints", "official_face_box", "render_frame", "render_pose",
    "wholebody_to_pose",
]
