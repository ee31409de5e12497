"""The one owner of the served API's names: the models a repository serves per prefix, their input and
output tensors and types, and the config.pbtxt parameters the server and the clients read.

The repository writer (exporter/stages/repository.py), the Triton runners (exporter/runtimes/triton.py),
the pixels graph (exporter/base/pixels.py), the clients and the benchmarks read these names instead of
spelling them. The python-backend sources in model_repository/ (and clients/clip_preprocess.py's
ImageLimits) are copied standalone into every repository and cannot import this module: they spell the
same names, and tests/test_contract.py checks that they agree.

Standard library only (no numpy, no torch, nothing from the exporter): the client library imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- models

DEFAULT_PREFIX = "clip"
# Every model of a repository by role; its name is `<prefix>_<role>`. The three ENSEMBLES are the
# public API, the others their steps.
MODEL_ROLES = (
    "image_preprocess",
    "image_normalize",
    "image_encoder",
    "image",
    "image_pixels",
    "text_tokenize",
    "text_encoder",
    "text",
)
ENSEMBLES = ("image", "image_pixels", "text")


def model_names(prefix: str) -> dict[str, str]:
    """Role -> model name for a repository written with `prefix` (in MODEL_ROLES order)."""
    return {role: f"{prefix}_{role}" for role in MODEL_ROLES}


# ---------------------------------------------------------------------------------------------- tensors

# Type names in config.pbtxt (ModelConfig's DataType) and on the wire (the inference protocol's datatype).
TYPE_STRING, TYPE_UINT8, TYPE_FP32 = "TYPE_STRING", "TYPE_UINT8", "TYPE_FP32"
BYTES, UINT8, FP32 = "BYTES", "UINT8", "FP32"
# numpy dtype name -> config.pbtxt type, for the encoders' tensors (the manifest records numpy names).
NP_TO_TRITON = {
    "float32": TYPE_FP32,
    "float16": "TYPE_FP16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
    "object": TYPE_STRING,
}

# The ensembles' tensors (and their first steps' inputs: the preprocess, normalize and tokenize models).
IMAGE_INPUT = "image"  # <prefix>_image: encoded image bytes (JPEG, PNG, ...), one per item
PIXELS_INPUT = "pixels"  # <prefix>_image_pixels: the crop, uint8 RGB [H, W, 3] per item
TEXT_INPUT = "text"  # <prefix>_text: UTF-8, one per item
EMBEDDING_OUTPUT = "embedding"  # every ensemble: L2-normalised FP32 [D] per item
# Output datatypes a client accepts as an embedding (the repository writes FP32).
EMBEDDING_DATATYPES = (FP32, "FP16", "FP64")


@dataclass(frozen=True)
class TensorSpec:
    """One public tensor: its name, its config.pbtxt type and its datatype on the wire."""

    name: str
    config_type: str
    datatype: str


IMAGE_TENSOR = TensorSpec(IMAGE_INPUT, TYPE_STRING, BYTES)
PIXELS_TENSOR = TensorSpec(PIXELS_INPUT, TYPE_UINT8, UINT8)
TEXT_TENSOR = TensorSpec(TEXT_INPUT, TYPE_STRING, BYTES)
EMBEDDING_TENSOR = TensorSpec(EMBEDDING_OUTPUT, TYPE_FP32, FP32)
# Ensemble role -> its one input (each has the one output EMBEDDING_TENSOR).
ENSEMBLE_INPUTS = {"image": IMAGE_TENSOR, "image_pixels": PIXELS_TENSOR, "text": TEXT_TENSOR}

# ---------------------------------------------------------------------------------------------- parameters

# config.pbtxt parameters (string values). Every ensemble carries these six: what a client needs for
# zero-shot scores and to tell replicas apart, read from the server alone (no manifest).
PARAM_MODEL_NAME = "model_name"
PARAM_EMBED_DIM = "embed_dim"
PARAM_LOGIT_SCALE = "logit_scale"
PARAM_LOGIT_BIAS = "logit_bias"  # only when the model has one (SigLIP)
PARAM_IMAGE_ENCODER_SHA256 = "image_encoder_sha256"
PARAM_TEXT_ENCODER_SHA256 = "text_encoder_sha256"
# How the encoders are served (the repository's --runtime and --precision): parity --url alone judges
# the live stages at the right tolerance without the repository folder.
PARAM_RUNTIME = "runtime"
PARAM_PRECISION = "precision"
# The preprocess model and the pixels ensemble: open_clip's transform as JSON (the manifest's section).
PARAM_PREPROCESS = "preprocess"
# The python steps (preprocess, tokenize).
PARAM_TOKENIZER = "tokenizer"  # the tokenize model: the manifest's tokenizer section as JSON
PARAM_OUTPUT_NAME = "output_name"
PARAM_OUTPUT_DTYPE = "output_dtype"  # the tokenize model's ids, a numpy name
PARAM_THREADS = "threads"  # the preprocess model's thread pool (0: the host's cores)
# The encoders.
PARAM_VALID_RANGE = "valid_range"  # "low,high" of the inputs the python runtime's encoder accepts
PARAM_OPTIMIZE = "optimize"  # the python runtime's encoder: ONNX Runtime graph optimisation on/off
# Triton's onnxruntime backend's own (the normalize model; model_repository/onnx_encoder reads the first).
PARAM_INTRA_OP_THREAD_COUNT = "intra_op_thread_count"
PARAM_INTER_OP_THREAD_COUNT = "inter_op_thread_count"
# Per-item limits (docs/limits.md), by the python step reading them; also RepositoryOptions fields and
# manifest keys. The pixels ensemble carries IMAGE_LIMITS too, for clients that crop.
PARAM_MAX_BYTES = "max_bytes"
PARAM_MAX_PIXELS = "max_pixels"
PARAM_MAX_ASPECT_RATIO = "max_aspect_ratio"
PARAM_MAX_RESIZED_PIXELS = "max_resized_pixels"
PARAM_MAX_CHARS = "max_chars"
PARAM_MAX_REQUEST_SECONDS = "max_request_seconds"
IMAGE_LIMITS = (PARAM_MAX_BYTES, PARAM_MAX_PIXELS, PARAM_MAX_ASPECT_RATIO, PARAM_MAX_RESIZED_PIXELS)  # preprocess
TEXT_LIMITS = (PARAM_MAX_CHARS,)  # the tokenize model
REQUEST_LIMITS = (PARAM_MAX_REQUEST_SECONDS,)  # both python models (not the pixels ensemble: nothing runs there)
