"""The memory mechanisms (docs/engines.md, "Memory"): they must change what is held, never the results.

No memory figure is asserted here (timed, shared machines); benchmarks/memory.py measures them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clip_triton.exporter.base.manifest import load_manifest
from clip_triton.exporter.runtimes.onnxruntime import ort_session
from clip_triton.exporter.stages import fp16 as precision
from helpers import linked_copy


def _all_at_once_ranges(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """The method before streaming: every float intermediate fetched to numpy in one run."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    outputs = {o.name for o in model.graph.output}
    infos = [vi for vi in model.graph.value_info
             if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in outputs]
    model.graph.output.extend(infos)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "all.onnx"
        onnx.save_model(model, str(path))
        session = ort_session(path, optimize=False)
        names = [o.name for o in session.get_outputs()][len(outputs):]
        ranges = {}
        for name, value in zip(names, session.run(names, feeds), strict=True):
            if value.size:
                finite = value[np.isfinite(value)]
                ranges[name] = float(np.abs(finite).max()) if finite.size else 0.0
    return ranges


def _calibration_feeds(export: Path, tower: str) -> dict[str, np.ndarray]:
    manifest = load_manifest(export)
    spec = manifest.tower(tower)
    rng = np.random.default_rng(precision.CALIBRATION_SEED)
    if tower == "image":
        data = rng.standard_normal((precision.CALIBRATION_BATCH, *spec.input.shape[1:]), np.float32) * 1.5
    else:
        data = rng.integers(1, 1000, (precision.CALIBRATION_BATCH, spec.input.shape[1])).astype(spec.input.dtype)
    return {spec.input.name: data}


@pytest.mark.parametrize("tower", ["image", "text"])
def test_streaming_calibration_equals_all_at_once(vitb32_export: Path, tower: str) -> None:
    path = vitb32_export / f"{tower}_encoder.onnx"
    feeds = _calibration_feeds(vitb32_export, tower)
    reference = _all_at_once_ranges(path, feeds)
    default_stats: dict[str, Any] = {}
    streamed = precision.tensor_ranges(path, feeds, stats=default_stats)
    tiny_stats: dict[str, Any] = {}
    one_row = precision.tensor_ranges(path, feeds, budget_bytes=1, stats=tiny_stats)  # one row per run
    assert default_stats["runs"] == [1, precision.CALIBRATION_BATCH - 1]
    assert tiny_stats["runs"] == [1] * precision.CALIBRATION_BATCH
    assert set(streamed) == set(reference) == set(one_row) and len(reference) > 100
    for name, peak in reference.items():
        assert streamed[name] == pytest.approx(peak, rel=1e-6, abs=1e-30), name
        assert one_row[name] == pytest.approx(peak, rel=1e-6, abs=1e-30), name


def test_streaming_calibration_non_finite_values_count_as_zero(tmp_path: Path) -> None:
    """inf and NaN are skipped exactly as `np.abs(x[np.isfinite(x)]).max()` skipped them."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Mul", ["x", "big"], ["scaled"]),  # up to ~1e5: beyond FP16's range
        helper.make_node("Div", ["scaled", "x"], ["ratio"]),  # x = 0 gives nan (0/0) and inf
        helper.make_node("Div", ["x", "zero"], ["all_inf"]),  # every value non-finite: range 0
        helper.make_node("Add", ["ratio", "all_inf"], ["summed"]),
        helper.make_node("Mul", ["summed", "zero"], ["out"]),
    ]
    inits = [numpy_helper.from_array(np.array(1e5, np.float32), "big"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph = helper.make_graph(nodes, "g", [x], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "tiny.onnx"
    onnx.save_model(model, str(path))
    feeds = {"x": np.array([[0.0, 1.0, -0.5, 0.25], [0.75, 0.0, -1.0, 0.125]], np.float32)}
    for budget in (None, 1):
        ranges = precision.tensor_ranges(path, feeds, budget_bytes=budget)
        assert ranges == _all_at_once_ranges(path, feeds)
        assert ranges["scaled"] == pytest.approx(1e5) and ranges["ratio"] == pytest.approx(1e5)
        assert ranges["all_inf"] == 0.0


def test_lean_shape_inference_equals_full(vitb32_export: Path) -> None:
    for tower in ("image", "text"):
        model = onnx.load(str(vitb32_export / f"{tower}_encoder.onnx"))
        full = onnx.shape_inference.infer_shapes(model)
        precision.apply_shapes(model, precision.infer_shapes_lean(model))
        assert [vi.SerializeToString() for vi in model.graph.value_info] == [
            vi.SerializeToString() for vi in full.graph.value_info
        ]
        assert list(model.graph.output) == list(full.graph.output)
        assert list(model.graph.input) == list(full.graph.input)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def test_streamed_fp16_weights_are_the_converters_bytes(fp16_export: Path) -> None:
    """Every FP16 weight that make_fp16 streamed from disk is exactly onnxruntime's converter on the
    FP32 weight (its clipping included); weights kept in FP32 are the FP32 bytes."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    for tower in ("image", "text"):
        fp32 = _initializers(fp16_export / f"{tower}_encoder.onnx")
        fp16 = _initializers(fp16_export / f"{tower}_encoder.fp16.onnx")
        shared = set(fp32) & set(fp16)
        assert len(shared) > 50 and {n for n, v in fp32.items() if v.nbytes > 1024} <= shared
        halved = 0
        for name in shared:
            source, written = fp32[name], fp16[name]
            if source.dtype == np.float32 and written.dtype == np.float16:
                expected = convert_np_to_float16(source)
                halved += 1
            else:
                expected = source
            assert written.shape == source.shape and written.tobytes() == expected.tobytes(), name
        assert halved > 50, tower


def test_fp16_from_hard_linked_external_weights_in_chunks(
    fp16_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An FP32 graph with its weights in a hard-linked sidecar (as `clip-triton repository` leaves
    an export; onnx's own loader refuses those) converts, 4 KiB at a time, to the same FP16 graph."""
    from clip_triton.exporter.base import onnx_weights

    src = fp16_export / "text_encoder.onnx"
    external = tmp_path / "ext"
    external.mkdir()
    onnx.save_model(onnx.load(str(src)), str(external / "text_encoder.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="text_encoder.onnx.data", size_threshold=1024)
    (tmp_path / "linked.data").hardlink_to(external / "text_encoder.onnx.data")
    assert (external / "text_encoder.onnx.data").stat().st_nlink == 2
    with pytest.raises(Exception, match="hard link"):
        onnx.load(str(external / "text_encoder.onnx"))  # why onnx_weights reads sidecars itself
    monkeypatch.setattr(onnx_weights, "WEIGHT_CHUNK_BYTES", 4096)
    spec = load_manifest(fp16_export).tower("text")
    feeds = _calibration_feeds(fp16_export, "text")
    dest = tmp_path / "out" / "text_encoder.fp16.onnx"
    dest.parent.mkdir()
    info = precision.convert_graph(external / "text_encoder.onnx", dest, precision.Fp16Policy.default(), feeds)
    assert spec.input.name in feeds and info["external_data"] is False
    assert sorted(p.name for p in dest.parent.iterdir()) == ["text_encoder.fp16.onnx"]
    assert sorted(p.name for p in external.iterdir()) == ["text_encoder.onnx", "text_encoder.onnx.data"]
    got, expected = _initializers(dest), _initializers(fp16_export / "text_encoder.fp16.onnx")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name


def test_large_fp16_graph_keeps_its_weights_in_an_aligned_sidecar(
    fp16_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above EXTERNAL_DATA_BYTES the FP16 graph is a skeleton plus `<name>.data` (page-aligned
    tensors), and ONNX Runtime runs it to the same embeddings as the inline graph."""
    from clip_triton.exporter.base import onnx_weights
    from clip_triton.exporter.runtimes.onnxruntime import ort_embed

    monkeypatch.setattr(precision, "EXTERNAL_DATA_BYTES", 1 << 20)
    dest = tmp_path / "image_encoder.fp16.onnx"
    info = precision.convert_graph(fp16_export / "image_encoder.onnx", dest, precision.Fp16Policy.default())
    assert info["external_data"] is True
    sidecar = dest.with_name(dest.name + ".data")
    assert dest.stat().st_size < 1 << 20 < sidecar.stat().st_size
    skeleton = onnx.load(str(dest), load_external_data=False)
    offsets = [onnx_weights.external_weight(i, tmp_path) for i in skeleton.graph.initializer]
    assert all(o is None or o.offset % onnx_weights.ALIGN == 0 for o in offsets) and any(offsets)
    feeds = _calibration_feeds(fp16_export, "image")
    pixels = next(iter(feeds.values()))[:2]
    inline = ort_session(fp16_export / "image_encoder.fp16.onnx", optimize=False)
    streamed = ort_session(dest, optimize=False)
    assert np.array_equal(ort_embed(streamed, pixels), ort_embed(inline, pixels))


def test_lowered_budget_writes_the_same_fp16_graphs(shapes_fp16_export: Path, tmp_path: Path) -> None:
    """A budget of 1 byte (one calibration row per run) decides exactly what the default decides (on the small
    shapes model: the rows streamed are the mechanism, whatever the model)."""
    out = linked_copy(shapes_fp16_export, tmp_path / "export",
                      skip=("image_encoder.fp16.onnx", "text_encoder.fp16.onnx"))
    precision.make_fp16(out, calibration_budget=1)
    default, lowered = load_manifest(shapes_fp16_export).fp16, load_manifest(out).fp16
    assert default is not None and lowered is not None
    for name, record in default["files"].items():
        assert lowered["files"][name]["sha256"] == record["sha256"], name
    for tower in ("image", "text"):
        for key in ("min_cosine", "mean_cosine", "max_abs_diff", "finite"):
            assert lowered[tower][key] == default[tower][key], (tower, key)
        graph_default, graph_lowered = dict(default[tower]["graph"]), dict(lowered[tower]["graph"])
        assert graph_lowered.pop("calibration_runs") == [1, 1, 1, 1]
        graph_default.pop("calibration_runs")
        assert json.dumps(graph_lowered, sort_keys=True) == json.dumps(graph_default, sort_keys=True)


def test_calibration_budget_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    from clip_triton.exporter.base.common import ClipTritonError

    monkeypatch.delenv(precision.CALIBRATION_BYTES_ENV, raising=False)
    assert precision.calibration_bytes() == precision.DEFAULT_CALIBRATION_BYTES
    assert precision.calibration_bytes("512M") == 512 << 20
    assert precision.calibration_bytes(1000) == 1000
    monkeypatch.setenv(precision.CALIBRATION_BYTES_ENV, "2G")
    assert precision.calibration_bytes() == 2 << 30
    for bad in ("lots", "0", "-5M"):
        with pytest.raises(ClipTritonError):
            precision.calibration_bytes(bad)


def test_export_order_puts_the_costlier_export_where_less_is_alive() -> None:
    from clip_triton.exporter.stages.export import plan_export_order

    gib = 1 << 30
    # ViT-L-14: both towers under 2 GiB (built in memory): the larger (image) last, alone.
    assert plan_export_order({"image": int(1.13 * gib), "text": int(0.46 * gib)}) == ("text", "image")
    # SigLIP2-SO400M-378: the 2.6 GiB text tower is written out as it goes, the 1.6 GiB image tower
    # is built in memory: the image tower last, although it is the smaller one.
    assert plan_export_order({"image": int(1.59 * gib), "text": int(2.64 * gib)}) == ("text", "image")
    # DFN ViT-H-14-378: the 2.4 GiB image tower streams, the 1.3 GiB text tower does not.
    assert plan_export_order({"image": int(2.36 * gib), "text": int(1.32 * gib)}) == ("image", "text")


def test_export_one_tower_at_a_time_writes_the_same_graphs(
    shapes_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release-as-you-go export (on the small shapes model, against the shared export of it) writes what
    the plain export wrote, with each tower's weights gone before its ONNX Runtime check opens."""
    import hashlib

    import clip_triton.exporter.stages.export as onnx_export
    from clip_triton.exporter.sources.open_clip import load_model

    loaded = load_model("ShapesCLIP-RN-T", pretrained="builtin")
    alive_at_check: list[int] = []  # PyTorch parameters alive when each ONNX Runtime check opens
    verify = onnx_export.verify_graph

    def counting_verify(*args: Any, **kwargs: Any) -> Any:
        alive_at_check.append(sum(p.numel() for p in loaded.model.parameters()))
        return verify(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "verify_graph", counting_verify)
    manifest = onnx_export.export_model(loaded, tmp_path / "export", release_model=True)
    assert len(alive_at_check) == 2 and max(alive_at_check) <= 2, alive_at_check  # logit_scale/bias at most
    reference = load_manifest(shapes_export)
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        # The same graph and weights; TorchScript numbers its generated tensor names globally, so
        # the tower exported second in one order gets other names (onnx::MatMul_2345) in the other.
        ours, theirs = onnx.load(str(tmp_path / "export" / name)), onnx.load(str(shapes_export / name))
        assert [n.op_type for n in ours.graph.node] == [n.op_type for n in theirs.graph.node], name
        digests = [sorted(hashlib.sha256(i.raw_data).hexdigest() for i in m.graph.initializer) for m in (ours, theirs)]
        assert digests[0] == digests[1], name
    for tower in ("image", "text"):
        ours, theirs = manifest.export_parity[tower]["min_cosine"], reference.export_parity[tower]["min_cosine"]
        assert ours == pytest.approx(theirs, abs=1e-9)
    assert list(manifest.export_parity)[-2:] == ["image", "text"]  # recorded in tower order
    # Both towers' weights are gone from the model (only logit_scale/bias may stay).
    assert sum(p.numel() for p in loaded.model.parameters()) <= 2


def test_parity_runner_holds_one_tower_session(vitb32_export: Path) -> None:
    from clip_triton.exporter.parity.samples import sample_pixels
    from clip_triton.exporter.runtimes.base import TowerBatch
    from clip_triton.exporter.runtimes.onnxruntime import OrtRunner

    manifest = load_manifest(vitb32_export)
    files = {t: vitb32_export / manifest.tower(t).file for t in ("image", "text")}
    runner = OrtRunner("fp32", files, one_tower_at_a_time=True)
    runner.open()
    assert runner.handles == {}
    runner.embed("image", TowerBatch(sample_pixels(manifest.preprocess, 2)))
    assert set(runner.handles) == {"image"}
    runner.embed("text", TowerBatch(np.ones((2, manifest.text.input.shape[1]), np.int32)))
    assert set(runner.handles) == {"text"}
    runner.close()


def test_memory_benchmark_runs_chosen_stages_and_cleans_up(tmp_path: Path) -> None:
    """`benchmarks.memory --stages export,parity` (how a model too large for the full chain is
    measured): each stage its own process with a peak recorded, parity without a server, the
    table says which stages were not asked for, and the model's export is deleted afterwards."""
    from benchmarks import memory

    model = "ShapesCLIP-RN-T"  # any model keeps the promise; the smallest one registered keeps it cheap
    out, work = tmp_path / "out", tmp_path / "work"
    assert memory.main(["--models", model, "--stages", "export,parity", "--out", str(out),
                        "--work", str(work), "--no-plots"]) == 0
    entry = json.loads((out / "results.json").read_text())["memory"]["models"][model]
    assert list(entry["stages"]) == ["export", "parity"] and entry["pass"] is True
    for stage in entry["stages"].values():
        assert stage["rc"] == 0 and 0 < stage["peak_gib"] < entry["bound_gib"]
        # No tritonserver below parity without --repository (a served repository's are GiBs: results.json). A
        # short-lived `ldconfig -p` that cuda.pathfinder runs when torch imports shows the forked parent's pages.
        assert stage.get("children_gib", 0.0) < 0.5, stage
    assert "--repository" not in entry["stages"]["parity"]["command"]
    row = next(line for line in (out / "RESULTS.md").read_text().splitlines() if line.startswith(f"| {model} |"))
    assert row.count("not asked (`--stages`)") == 2
    assert not (work / f"mem-{model}" / "export").exists() and (work / f"mem-{model}" / "logs" / "parity.log").is_file()
