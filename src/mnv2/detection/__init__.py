"""SSDLite detection outside the model (paper 6.2): anchors, box coding, matching, loss and post-processing.

Conventions: class 0 is background, objects are 1..C; boxes are xyxy normalised to the network input unless a name
says cxcywh; post-processing alone converts to original-image pixels.
"""

from .anchors import LAYOUTS, feature_map_sizes, num_anchors_per_location, ssd_anchors
from .box_coder import BoxCoder
from .loss import KINDS, encode_targets, multibox_loss
from .matcher import match_anchors
from .postprocess import per_image, postprocess, select_detections

__all__ = [
    "KINDS",
    "LAYOUTS",
    "BoxCoder",
    "encode_targets",
    "feature_map_sizes",
    "match_anchors",
    "multibox_loss",
    "num_anchors_per_location",
    "per_image",
    "postprocess",
    "select_detections",
    "ssd_anchors",
]
