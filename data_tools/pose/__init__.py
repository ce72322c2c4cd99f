"""Keypoints, pose backends, the pose renderer, the face cropper and the pose-quality score."""

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
from data_tools.pose.quality import (
    PoseQualityRules,
    describe_pose_quality,
    pose_quality,
)
from data_tools.pose.render import render_frame, render_pose

__all__ = [
    "BACKENDS", "PoseBackend", "PoseBackendError", "PoseQualityRules", "PoseSequence", "crop_faces",
    "describe_pose_quality", "face_boxes", "get_pose_backend", "load_keypoints", "official_face_box",
    "pose_quality", "render_frame", "render_pose", "wholebody_to_pose",
]
