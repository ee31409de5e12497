"""The quantize stage (docs/int8.md): INT8 Q/DQ graphs of the trained ShapesCLIP-RN-T, the policy, the gate
(cosine and agreement, one line, nothing written), the graph TensorRT takes (symmetric INT8, per-channel
weights), and an int8 repository served by the embedded tritonserver, judged at its own tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from clip_triton.exporter.base.common import ParityError, Progress
from clip_triton.exporter.base.manifest import ARTIFACTS, STAGE_OF_ARTIFACT, load_manifest
from clip_triton.exporter.runtimes.onnxruntime import ort_embed, ort_session
from helpers import linked_copy, run_cli, scratch_dir

pytest.importorskip("nncf")

LABELLED = 48  # held-out images in these tests' agreement gate (the default is 120)


@pytest.fixture(scope="module")
def int8_export(shapes_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """The session's ShapesCLIP-RN-T export (builtin weights, hard-linked) quantized with the defaults, once."""
    from clip_triton.exporter.stages.quantize import QuantizeOptions, make_int8

    with scratch_dir(tmp_path_factory, "int8_export") as base:
        out = linked_copy(shapes_export, base / "export")
        make_int8(out, QuantizeOptions(labelled_samples=LABELLED))
        yield out


def _zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    return [
        numpy_helper.to_array(inits[n.input[2]])
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]


def test_int8_graphs_manifest_policy_and_qdq(int8_export: Path) -> None:
    manifest = load_manifest(int8_export)
    names = ARTIFACTS[("onnx", "int8")]
    assert names == {"image": "image_encoder.int8.onnx", "text": "text_encoder.int8.onnx"}
    assert STAGE_OF_ARTIFACT[("onnx", "int8")] == "quantize"
    assert manifest.artifacts("onnx", "int8") == names
    section = manifest.int8
    assert section is not None and section["quantizer"].startswith("nncf")
    policy = section["policy"]
    assert {"LayerNormalization", "Softmax"} <= set(policy["keep_fp32_ops"]) and policy["keep_first_layer"]
    assert policy["keep_final_projection"] and "per output channel" in policy["weights"]
    for tower in ("image", "text"):
        record = section[tower]
        assert record["min_cosine"] >= section["threshold"] == 0.98 and record["finite"]
        graph = record["graph"]
        assert graph["quantized_weights"] > 0 and graph["per_channel_weights"] == graph["quantized_weights"]
        model = onnx.load(str(int8_export / names[tower]))
        # What TensorRT's explicit quantization takes: signed INT8, zero point 0, everywhere.
        zeros = _zero_points(model)
        assert zeros and all(z.dtype == np.int8 and not z.any() for z in zeros)
        # The policy's nodes read FP32 weights (no DequantizeLinear in front of them).
        producers = {out: n for n in model.graph.node for out in n.output}
        by_name = {n.name: n for n in model.graph.node}
        for name in graph["kept_fp32_nodes"]:
            weight = by_name[name].input[1]
            assert weight not in producers or producers[weight].op_type != "DequantizeLinear", name
        assert not [n for n in model.graph.node if n.op_type == "LayerNormalization"
                    and n.input[0] in producers and producers[n.input[0]].op_type == "DequantizeLinear"]
    kept = section["image"]["graph"]["kept_fp32_nodes"]
    assert any("conv1" in name for name in kept) and len(kept) == 2  # the stem, the attention-pool projection
    # The agreement gate's rows, on the trained model's held-out set.
    rows = {row["set"]: row for row in section["accuracy"]}
    assert rows["shapes/shape_colour"]["agreement"] >= section["min_agreement"] == 0.95
    assert rows["shapes/shape_colour"]["images"] == LABELLED
    assert section["files"].keys() == set(names.values())
    # The CPU provider runs it (optimiser on: fused integer kernels), unit-norm embeddings.
    session = ort_session(int8_export / names["image"])
    out = ort_embed(session, np.random.default_rng(0).standard_normal((2, 3, 64, 64), np.float32))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_gate_refuses_a_corrupted_scale_in_one_line(int8_export: Path, tmp_path: Path) -> None:
    """The accuracy gate on a graph whose weight scales were corrupted: ParityError naming the row."""
    from clip_triton.exporter.parity import labelled as labelled_sets
    from clip_triton.exporter.parity.gate import gate_agreement, labelled_references
    from clip_triton.exporter.sources import load_reference, release_model

    manifest = load_manifest(int8_export)
    loaded = load_reference(manifest, export_dir=int8_export)
    check = labelled_references(manifest, loaded, labelled_sets.load("shapes", 24))
    release_model(loaded)
    assert check is not None
    model = onnx.load(str(int8_export / "image_encoder.int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    rng = np.random.default_rng(0)
    for node in weight_dq:  # every weight scale off by up to x8 per channel
        scale = numpy_helper.to_array(inits[node.input[1]])
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(
            (scale * rng.uniform(0.125, 8, scale.shape)).astype(np.float32), node.input[1]))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    sessions = {t: ort_session(int8_export / ARTIFACTS[("onnx", "int8")][t]) for t in ("image", "text")}
    broken = ort_session(tmp_path / "broken.onnx")
    embeds = {
        "image": check.embed("image", lambda x: ort_embed(broken, x)),
        "text": check.embed("text", lambda x: ort_embed(sessions["text"], x)),
    }
    with pytest.raises(ParityError) as error:
        gate_agreement(check, embeds, stage="INT8", threshold=0.95, progress=Progress("t", quiet=True))
    message = str(error.value)
    assert message.startswith("INT8 accuracy gate failed: shapes/shape_colour agreement") and "\n" not in message
    # The sound graph passes the same gate.
    sound = {t: check.embed(t, lambda x, t=t: ort_embed(sessions[t], x)) for t in ("image", "text")}
    rows = gate_agreement(check, sound, stage="INT8", threshold=0.95, progress=Progress("t", quiet=True))
    assert all(row["status"] == "pass" for row in rows if "min_agreement" in row)


def test_absurd_threshold_exits_1_and_writes_nothing(int8_export: Path, tmp_path: Path) -> None:
    export = linked_copy(int8_export, tmp_path / "export", skip=(".int8.onnx",))
    before = (export / "manifest.json").read_text()
    result = run_cli(
        "quantize", "--export", str(export), "--min-cosine", "0.99999", "--labelled-set", "none", "-q"
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: INT8 parity failed") and "no INT8 files written" in last
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in export.iterdir()) == ["image_encoder.onnx", "manifest.json", "text_encoder.onnx"]
    assert (export / "manifest.json").read_text() == before


def test_bad_options_are_one_line_errors(int8_export: Path, tmp_path: Path) -> None:
    for args, words in (
        (["--quantizer", "tflite"], "--quantizer must be one of nncf, onnxruntime"),
        (["--calibration-images", str(tmp_path / "none")], "is not a folder"),
        (["--min-agreement", "2"], "--min-agreement"),
        (["--keep-fp32", "LayerNorm"], "not ONNX op types"),
    ):
        result = run_cli("quantize", "--export", str(int8_export), *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    fp32_only = linked_copy(int8_export, tmp_path / "fp32", skip=(".int8.onnx",))
    result = run_cli("repository", "--export", str(fp32_only), "--out", str(tmp_path / "r"), "--runtime", "python",
                     "--precision", "int8", "--no-python-deps")
    assert result.returncode == 2 and "run `clip-triton quantize`" in result.stderr, result.stderr
    result = run_cli("repository", "--export", str(int8_export), "--out", str(tmp_path / "r"), "--runtime",
                     "tensorrt", "--precision", "int8", "--no-python-deps")
    assert result.returncode == 2 and "engines --precision int8" in result.stderr, result.stderr
    result = run_cli("engines", "--export", str(int8_export), "--precision", "int8")
    assert result.returncode == 3 and "TensorRT" in result.stderr, result.stderr  # no TensorRT here


def test_int8_repository_served_live_at_its_tolerance(int8_export: Path, tmp_path: Path) -> None:
    """repository --precision int8 (python runtime) on the embedded tritonserver: parity's onnx-int8 and
    triton stages pass at the int8 class, with the labelled-set rows."""
    from clip_triton.exporter.parity.run import run_parity
    from clip_triton.exporter.stages.repository import RepositoryOptions, write_repository

    export = linked_copy(int8_export, tmp_path / "export")
    repo = write_repository(
        export, tmp_path / "repo", RepositoryOptions(runtime="python", precision="int8", python_deps=False)
    )
    config = (repo / "clip_image_encoder" / "config.pbtxt").read_text()
    assert 'string_value: "true"' in config  # the optimiser on: fused INT8 kernels
    record = json.loads((repo / "manifest.json").read_text())["repository"]
    assert record["precision"] == "int8"
    result = run_parity(export, repository=repo, samples=2, labelled_samples=24, out=tmp_path / "parity")
    assert result["passed"], result["failures"]
    stages = {s["stage"]: s for s in result["stages"]}
    assert stages["onnx-int8"]["precision"] == "int8" and stages["onnx-int8"]["threshold"] == 0.98
    assert stages["triton"]["status"] == "pass" and stages["triton"]["precision"] == "int8"
    assert stages["triton"]["accuracy"][0]["set"] == "shapes/shape_colour"
    assert result["thresholds"]["int8"] == 0.98 and result["thresholds"]["agreement_int8"] == 0.95


def test_unsigned_activations_become_signed_with_the_same_range(tmp_path: Path) -> None:
    """signed_activations: UINT8 (zero point 0) Q/DQ -> INT8 with scale x 255/127; what ONNX Runtime computes
    stays within one new quantization step, and check_qdq accepts the result (TensorRT's INT8-only rule)."""
    from onnx import TensorProto, helper

    from clip_triton.exporter.base.common import ClipTritonError
    from clip_triton.exporter.stages.quantize import check_qdq, signed_activations

    scale = np.float32(0.02)
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")],
        value_info=[helper.make_tensor_value_info("q", TensorProto.UINT8, [None, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ClipTritonError, match="not symmetric INT8"):
        check_qdq(model)
    x = np.random.default_rng(0).uniform(-1, 5, (4, 8)).astype(np.float32)
    assert signed_activations(model) == 1
    check_qdq(model)
    onnx.save(model, str(tmp_path / "signed.onnx"))
    y = ort_session(tmp_path / "signed.onnx").run(None, {"x": x})[0]
    step = scale * 255 / 127
    np.testing.assert_allclose(y, np.clip(np.maximum(x, 0), 0, 127 * step), atol=step / 2 + 1e-6)


def test_nncf_gets_a_weight_free_skeleton_and_writes_the_same_graph(
    int8_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory (docs/int8.md, "Memory"): NNCF is handed the graph with its weights in a sidecar, not the
    weights themselves; the INT8 graph is the one NNCF makes from the whole model, weight for weight, and
    the temporary skeleton is gone afterwards."""
    import nncf

    from clip_triton.exporter.base.onnx_weights import INLINE_MAX_BYTES, tensor_bytes
    from clip_triton.exporter.stages import quantize

    export = linked_copy(int8_export, tmp_path / "export", skip=(".int8.onnx",))
    spec = load_manifest(export).image
    feeds = np.random.default_rng(0).standard_normal([8, *spec.input.shape[1:]]).astype(np.float32)
    handed: list[onnx.ModelProto] = []
    real = nncf.quantize

    def whole_model(model: onnx.ModelProto, *args, **kwargs) -> onnx.ModelProto:
        handed.append(model)
        # What NNCF made before: the model with its weights inside, no sidecar.
        whole = onnx.load(str(export / spec.file))
        quantize._name_nodes(whole)
        kwargs["advanced_parameters"].backend_params.clear()
        return real(whole, *args, **kwargs)

    before = sorted(p.name for p in export.iterdir())
    monkeypatch.setattr(nncf, "quantize", whole_model)
    reference, _ = quantize.quantize_nncf(export / spec.file, tmp_path / "whole.onnx", "image", spec.input.name,
                                          feeds, quantize.Int8Policy.default())
    monkeypatch.undo()
    ours, _ = quantize.quantize_nncf(export / spec.file, tmp_path / "ours.onnx", "image", spec.input.name, feeds,
                                     quantize.Int8Policy.default())
    large = [i for i in handed[0].graph.initializer if tensor_bytes(i) > INLINE_MAX_BYTES]
    assert large and not any(i.HasField("raw_data") for i in large)  # every weight in the sidecar
    assert sorted(p.name for p in export.iterdir()) == before  # the skeleton and its sidecar removed
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in reference.graph.node]
    theirs = {i.name: numpy_helper.to_array(i) for i in reference.graph.initializer}
    mine = {i.name: numpy_helper.to_array(i) for i in ours.graph.initializer}
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def test_nncf_sends_no_telemetry() -> None:
    """Outside pytest (where NNCF silences itself), the quantize stage's NNCF is the telemetry stub: nothing is
    sent to NNCF's analytics from a user's machine or CI."""
    probe = (
        "from clip_triton.exporter.stages.quantize import require_nncf; require_nncf()\n"
        "import nncf.telemetry.wrapper as w; print(isinstance(w.telemetry, w.NNCFTelemetryStub), type(w.telemetry))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI", "NNCF_DEV")}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[0] == "True", run.stdout  # (the stub is a MagicMock; else an NNCFTelemetry)
