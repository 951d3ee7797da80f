"""What differs between the transformers versions the integration supports (pyproject.toml: the
``transformers`` extra), in one place, each behind a version check with the version it changed in."""

from __future__ import annotations

import transformers
from packaging.version import Version

VERSION = Version(transformers.__version__)

#: 5.18: forwards take ``mm_encoder_outputs`` (pre-encoded image / video outputs); Qwen3-VL's reduced
#: deepstack features reach the language model only through it.
HAS_MM_ENCODER_OUTPUTS = VERSION >= Version("5.18")

#: 5.18: LLaVA-OneVision's ``get_video_features`` appends the image_newline to each video itself;
#: before, the forward appended it after calling ``get_video_features``.
ONEVISION_VIDEO_FEATURES_END_WITH_NEWLINE = VERSION >= Version("5.18")
