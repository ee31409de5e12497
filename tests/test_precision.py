"""The fp16 stage: real ONNX graphs, the real onnxruntime converter, ONNX Runtime CPU (optimiser off)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from clip_triton.exporter.base.manifest import load_manifest, sha256_file
from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session
from helpers import linked_copy, run_cli

FP16_FILES = ("image_encoder.fp16.onnx", "text_encoder.fp16.onnx")


def _copy_fp32(src: Path, dest: Path) -> Path:
    return linked_copy(src, dest, skip=FP16_FILES)


def test_vitb32_fp16_parity_and_manifest(fp16_export: Path) -> None:
    m = load_manifest(fp16_export)
    section = m.fp16
    assert section is not None
    for tower in ("image", "text"):
        assert section[tower]["min_cosine"] >= 0.999, section[tower]
        assert section[tower]["finite"]
        assert section[tower]["graph"]["fp16_range_violation_count"] == 0
    assert section["zero_shot_top1_agreement"] == 1.0
    policy = section["policy"]
    assert {"LayerNormalization", "Softmax", "ReduceMean", "Pow"} <= set(policy["keep_fp32_ops"])
    assert policy["keep_io_types"] and policy["keep_final_normalisation"]
    assert set(section["files"]) == set(FP16_FILES)
    for name, record in section["files"].items():
        assert sha256_file(fp16_export / name) == record["sha256"]
    # FP16 weights: the graph is about half the FP32 size.
    assert (fp16_export / FP16_FILES[0]).stat().st_size < 0.55 * (fp16_export / "image_encoder.onnx").stat().st_size
    assert not [p for p in fp16_export.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_fp16_graph_types_policy_and_checker(fp16_export: Path) -> None:
    from onnx import TensorProto

    path = fp16_export / FP16_FILES[0]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [TensorProto.FLOAT]
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    matmul_weights = [i for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv") for i in n.input[1:2]]
    assert matmul_weights and all(types[w] == TensorProto.FLOAT16 for w in matmul_weights if w in types)
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
    # The final normalisation is FP32 all the way to the output: exactly unit norm.
    session = ort_session(path, optimize=False)
    out = ort_embed(session, np.random.default_rng(0).standard_normal((3, 3, 224, 224), np.float32))
    assert out.shape == (3, 512) and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


@pytest.mark.slow  # a second full conversion (~1-2 min on 2 cores)
def test_threshold_failure_exits_1_and_writes_nothing(vitb32_export: Path, tmp_path: Path) -> None:
    out = _copy_fp32(vitb32_export, tmp_path / "export")
    before = (out / "manifest.json").read_text()
    result = run_cli("fp16", "--export", str(out), "--min-cosine", "1.0", "-q")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: FP16 parity failed") and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx", "manifest.json", "text_encoder.onnx"]
    assert (out / "manifest.json").read_text() == before


def test_bad_inputs_are_one_line_errors(tmp_path: Path, vitb32_export: Path) -> None:
    result = run_cli("fp16", "--export", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("fp16", "--export", str(vitb32_export), "--keep-fp32", "LayerNorm")
    assert result.returncode == 2 and "not ONNX op types" in result.stderr, result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("fp16", "--export", str(empty))
    assert result.returncode == 2 and "manifest.json" in result.stderr


def test_policy_is_data_and_overridable() -> None:
    from clip_triton.exporter.stages.fp16 import Fp16Policy, parse_op_list

    default = Fp16Policy.default(parse_op_list("Erf,Gemm"))
    assert {"Erf", "Gemm", "LayerNormalization"} <= set(default.keep_fp32_ops)
    record = json.loads(json.dumps(default.to_dict()))
    assert record["reasons"]["Erf"] == "added by the user"
    bare = Fp16Policy.none()
    assert bare.keep_fp32_ops == [] and bare.overflow_threshold is None and not bare.keep_final_normalisation


def _outlier_checkpoint(path: Path) -> float:
    """A ViT-B-32 whose pre-norm activations reach ~3e3, as trained CLIP models' do.

    A few residual channels get a large MLP output bias and weight scale (the "massive
    activations" of trained transformers) and a few later LayerNorm gains grow.
    """
    import torch

    from clip_triton.exporter.parity.samples import sample_pixels
    from clip_triton.exporter.sources.open_clip import load_model

    loaded = load_model("ViT-B-32", random_weights=True)
    model = loaded.model
    channels = [7, 300, 501]
    with torch.no_grad():
        for tower in (model.visual.transformer, model.transformer):
            proj = tower.resblocks[2].mlp.c_proj
            proj.bias[channels] += 3000.0
            proj.weight[channels] *= 30.0
            for block in tower.resblocks[3:]:
                block.ln_2.weight[channels[:1]] *= 20.0
    peak = 0.0

    def hook(_module: object, inputs: tuple, _output: object) -> None:
        nonlocal peak
        peak = max(peak, float(inputs[0].abs().max()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        model.encode_image(torch.from_numpy(sample_pixels(loaded.preprocess, 2)))
    for handle in handles:
        handle.remove()
    torch.save(model.state_dict(), path)
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("opset", [16, 18])  # 16: LayerNorm decomposed (ReduceMean/Pow/Sqrt/Div); 18: fused
def test_outlier_activations_policy_keeps_parity_and_no_policy_breaks(tmp_path: Path, opset: int) -> None:
    ckpt = tmp_path / "outliers.pt"
    peak = _outlier_checkpoint(ckpt)
    assert 1e3 <= peak <= 1e4, peak
    out = tmp_path / "export"
    result = run_cli("export", "--model", "ViT-B-32", "--checkpoint", str(ckpt), "--opset", str(opset),
                     "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    ops = {n.op_type for n in onnx.load(str(out / "image_encoder.onnx"), load_external_data=False).graph.node}
    assert ("LayerNormalization" in ops) == (opset >= 17)

    # Without the policy: FP16 tensors overflow (inf on a GPU); the stage refuses and writes nothing.
    result = run_cli("fp16", "--export", str(out), "--no-default-policy", "-q")
    assert result.returncode == 1, result.stderr
    assert "FP16 range check failed" in result.stderr
    assert not any(p.name.endswith(FP16_FILES) for p in out.iterdir())

    # With the default policy: parity holds and nothing computed in FP16 overflows.
    result = run_cli("fp16", "--export", str(out), "-q")
    assert result.returncode == 0, result.stderr
    section = load_manifest(out).fp16
    for tower in ("image", "text"):
        assert section[tower]["min_cosine"] >= 0.999
        assert section[tower]["graph"]["fp16_range_violation_count"] == 0
        assert section[tower]["graph"]["peak_abs_activation"] > 1e3


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"])
def test_siglip_fp16_parity(model: str, tmp_path: Path) -> None:
    """SigLIP2 is the known hard case (NVIDIA/TensorRT#4373: cosine 0.65 as a TensorRT FP16 engine)."""
    out = tmp_path / "export"
    result = run_cli("export", "--model", model, "--random-weights", "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    result = run_cli("fp16", "--export", str(out), "-q")
    assert result.returncode == 0, result.stderr
    section = load_manifest(out).fp16
    for tower in ("image", "text"):
        assert section[tower]["min_cosine"] >= 0.999, (tower, section[tower]["min_cosine"])
        assert section[tower]["graph"]["fp16_range_violation_count"] == 0
