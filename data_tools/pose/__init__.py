"""Keypoints, pose backends, the pose renderer, the face cropper and the pose-quality score."""

from data_tools.pose.backends import get_pose_backend
from data_tools.pose.face import crop_faces, face_boxes
from data_tools.pose.format import PoseSequence
from data_tools.pose.render import render_pose
