"""fluxo's REST service: BentoML on ONNX Runtime, fed from a model directory.

This package never imports ``pipelines`` or torch, so a serving image needs only
onnxruntime, numpy, pillow and bentoml. Importing it reads configuration and
nothing else; onnxruntime and bentoml load only in the modules that need them.
"""

from __future__ import annotations

from serving.config import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    CANARY_SHARE_ENV,
    CHALLENGER_DIR_ENV,
    DRIFT_STATUS_ENV,
    MODEL_DIR_ENV,
    PAYLOAD_LOG_ENV,
    PAYLOAD_SAMPLE_ENV,
    PAYLOAD_SPOOL_ENV,
    ROLLOUT_ENV,
    ROLLOUT_MODES,
    SHADOW_SAMPLE_ENV,
    ServingConfig,
    read_secret_file,
)
from serving.errors import ServingError

__all__ = [
    "API_KEY_ENV", "API_KEY_FILE_ENV", "CANARY_SHARE_ENV", "CHALLENGER_DIR_ENV", "DRIFT_STATUS_ENV", "MODEL_DIR_ENV", "PAYLOAD_LOG_ENV", "PAYLOAD_SAMPLE_ENV", "PAYLOAD_SPOOL_ENV", "ROLLOUT_ENV", "ROLLOUT_MODES",
    "SHADOW_SAMPLE_ENV", "ServingConfig", "ServingError", "read_secret_file",
]
