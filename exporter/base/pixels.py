"""The pixels entry point's normalisation step: uint8 [N, H, W, 3] -> the image encoder's input.

`<prefix>_image_pixels` takes what `Preprocessor.crop` returns (open_clip's transform up to and
including the crop, RGB, uint8): 4x fewer bytes than FP32 pixels, no decode on the server. What
is left of open_clip's transform (ToTensor's / 255, Normalize, HWC -> CHW) is this graph, served
by ONNX Runtime next to the encoder, so that path runs no python per image. Every op is the
float32 arithmetic of `Preprocessor.normalize`, in the same order, so both paths hand the
encoder the same bits (tests/test_pixels.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clip_triton.clients.contract import PIXELS_INPUT

# IR 8 / opset 17: loadable by the ONNX Runtime of every Triton release this tool targets (23.xx on).
IR_VERSION = 8
OPSET = 17


def normalize_graph(preprocess: Any, output_name: str, output_dtype: str = "float32") -> Any:
    """The ONNX model: Cast -> Div 255 -> Sub mean -> Div std -> Transpose (-> Cast to FP16)."""
    from onnx import TensorProto, helper, numpy_helper

    h, w = (int(s) for s in preprocess.size)
    mean = numpy_helper.from_array(np.asarray(preprocess.mean, np.float32), "mean")
    std = numpy_helper.from_array(np.asarray(preprocess.std, np.float32), "std")
    scale = numpy_helper.from_array(np.asarray(255.0, np.float32), "scale")
    last = "chw"
    nodes = [
        helper.make_node("Cast", [PIXELS_INPUT], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["unit"]),
        helper.make_node("Sub", ["unit", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["hwc"]),
        helper.make_node("Transpose", ["hwc"], [last], perm=[0, 3, 1, 2]),
    ]
    out_type = TensorProto.FLOAT16 if output_dtype == "float16" else TensorProto.FLOAT
    if out_type == TensorProto.FLOAT16:
        nodes.append(helper.make_node("Cast", [last], [output_name], to=TensorProto.FLOAT16))
    else:
        nodes[-1].output[0] = output_name
    graph = helper.make_graph(
        nodes,
        "clip_image_normalize",
        [helper.make_tensor_value_info(PIXELS_INPUT, TensorProto.UINT8, ["batch", h, w, 3])],
        [helper.make_tensor_value_info(output_name, out_type, ["batch", 3, h, w])],
        initializer=[scale, mean, std],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="clip-triton")
    model.ir_version = IR_VERSION
    return model


def save_normalize_graph(path: Path, preprocess: Any, output_name: str, output_dtype: str = "float32") -> None:
    import onnx

    model = normalize_graph(preprocess, output_name, output_dtype)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
