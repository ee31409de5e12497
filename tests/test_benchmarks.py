"""Smoke tests of benchmarks/ with minimal iterations (no timing assertions). What they check holds for any
model, so they run on the small ShapesCLIP-RN-T: the encoder benchmark's cells, report and plot, and the served
parts (load generator, perf_analyzer, repository variants). `make bench-quick` measures ViT-B-32."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

# benchmarks/ is a folder of the source tree, not an installed package (`python -m benchmarks.run`).
from benchmarks import encoders, load, plots, report, run
from benchmarks.common import Settings, latency_stats, machine, versions
from clip_triton.exporter.base.common import Progress

QUIET = Progress("bench", quiet=True)


def _tiny_settings() -> Settings:
    settings = Settings.quick_run(threads=1)
    settings.batches = [1, 2]
    settings.cell_budget_s = 0.0
    settings.min_iters = 1
    settings.max_iters = 1
    settings.min_iters_large = 1
    settings.preprocess_budget_s = 0.0
    settings.tokenize_budget_s = 0.0
    return settings


def test_latency_stats() -> None:
    stats = latency_stats([0.001, 0.002, 0.003, 0.004])
    assert stats["n"] == 4
    assert stats["median_ms"] == pytest.approx(2.5)
    assert stats["min_ms"] == pytest.approx(1.0) and stats["max_ms"] == pytest.approx(4.0)
    assert stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_encoder_bench_report_and_plots(shapes_export: Path, tmp_path: Path) -> None:
    from clip_triton.exporter.sources.open_clip import load_model

    settings = _tiny_settings()
    model = "ShapesCLIP-RN-T"
    loaded = load_model(model, pretrained="builtin")
    # The FP16 conversion is not part of this smoke test (its own tests cover it): the FP16 runner
    # must then be skipped with the reason, not silently dropped.
    info = {"export_seconds": 0.0, "fp16": "not converted in this test", "fp16_seconds": 0.0,
            "tensorrt": "skipped: not in this test"}
    towers = {t: encoders.bench_tower(loaded, shapes_export, t, settings, QUIET) for t in ("image", "text")}
    for tower, runtimes in towers.items():
        # The registry's runners, under the names parity uses; those that cannot run are listed.
        assert {"pytorch", "pytorch-cuda", "onnx-fp32", "onnx-fp16", "tensorrt"} <= set(runtimes)
        assert "no FP16 graphs" in runtimes["onnx-fp16"]["skipped"]
        assert runtimes["tensorrt"]["skipped"]
        for key in ("pytorch", "onnx-fp32"):
            for batch in ("1", "2"):
                cell = runtimes[key]["batches"][batch]
                assert cell["n"] == 1 and cell["throughput"] > 0, (tower, key, batch)
                assert cell["speedup_vs_torch"] > 0
                # The same embeddings as PyTorch: a fast but wrong runtime must show here.
                assert cell["min_cosine_vs_torch"] > 0.9999, (tower, key, batch, cell["min_cosine_vs_torch"])
        assert runtimes["pytorch"]["batches"]["1"]["speedup_vs_torch"] == pytest.approx(1.0)

    results = {
        "date": "today", "command": "pytest", "note": "smoke test", "seconds": 1.0,
        "machine": {**machine(), "load_average_end": None}, "versions": versions(),
        "settings": settings.to_dict(), "not_measured": ["tensorrt: not in this test"],
        "encoders": {
            "threads": {"torch.set_num_threads": 1, "ort.intra_op_num_threads": 1, "ort.inter_op_num_threads": 1},
            "runtimes": {k: v["label"] for k, v in towers["image"].items()},
            "models": {model: {"prepare": info, "towers": towers}},
        },
    }
    json.dumps(results)  # results.json must be plain JSON
    text = report.render(results, tmp_path / "RESULTS.md")
    assert "## Encoders" in text and "ONNX Runtime FP32 (CPU)" in text
    assert "## GPU" in text and report.GPU_PLACEHOLDER in text
    files = plots.write_all(results, tmp_path)
    assert [f.name for f in files] == [f"encoders_{model}.png"]
    assert files[0].stat().st_size > 1000


def test_gpu_section_is_kept(tmp_path: Path) -> None:
    previous = tmp_path / "RESULTS.md"
    previous.write_text("# Benchmarks\n\nold\n\n## GPU\n\nH100: 5000 images/s\n")
    assert report._gpu_section(previous).startswith("## GPU\n\nH100: 5000 images/s")


def test_preprocess_section_through_main(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = run.main(["--quick", "--sections", "preprocess", "--out", str(out), "--no-plots"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["preprocess"]["images"]["summary"]
    # The served path is pixel-identical to open_clip; the draft path is measured, and not exact
    # on the large JPEGs (it decodes them at a reduced scale).
    assert summary["exact"]["bit_exact"] is True
    assert summary["draft"]["bit_exact"] is False and summary["draft"]["max_abs_diff"] > 0
    assert results["preprocess"]["tokenize"]["identical_to_open_clip"] is True
    text = (out / "RESULTS.md").read_text()
    assert "not bit-exact" in text and "## GPU" in text and "perf_analyzer" in text


def test_bad_section_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--sections", "bogus", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown bogus" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.server
def test_load_generator_against_served_model(served_shapes) -> None:  # noqa: ANN001 - fixture tuple
    server, _repo, _export = served_shapes
    for tower in ("image", "text"):
        stats = asyncio.run(
            load._level(server.grpc_url, f"clip_{tower}", tower, load._payloads(tower)[:2], 2, 0.3, 6,
                        f"clip_{tower}_encoder")
        )
        assert stats["errors"] == 0, stats["first_errors"]
        assert 1 <= stats["requests"] <= 6 and stats["throughput"] > 0
        assert stats["encoder_avg_batch"] is not None and stats["encoder_avg_batch"] >= 1.0


@pytest.mark.server
def test_perf_analyzer_drives_every_public_model(served_shapes, tmp_path: Path) -> None:  # noqa: ANN001
    """NVIDIA's perf_analyzer (make perf-tools) against the real server, with the inputs load.py writes:
    every model answers, and the figures are parsed from its CSV report."""
    from benchmarks.perf_analyzer import PerfAnalyzerError, locate
    from clip_triton.clients.contract import model_names

    try:
        tool = locate()
    except PerfAnalyzerError as exc:
        pytest.fail(f"{exc} (make test installs it)")
    assert tool.version().startswith("Perf Analyzer Version 2.51")
    server, _repo, _export = served_shapes
    names = model_names("clip")
    inputs = load._input_files(server.grpc_url, names, tmp_path)
    assert set(inputs) == {names[r] for r in ("image", "image_pixels", "text", "image_encoder", "text_encoder",
                                               "image_preprocess")}
    for model in (names["image_pixels"], names["text"]):
        level = tool.measure(server.grpc_url, model, inputs[model][1], 2, tmp_path, window_requests=8)
        assert level["concurrency"] == 2 and level["throughput"] > 0
        assert 0 < level["median_ms"] <= level["p99_ms"]


def test_no_batching_copy_has_no_dynamic_batching(shapes_export: Path, tmp_path: Path) -> None:
    from clip_triton.exporter.stages.repository import parse_config

    repos = load.write_repositories(shapes_export, tmp_path)
    for variant, repo in repos.items():
        for path in repo.glob("*/config.pbtxt"):
            config = parse_config(path.read_text())
            if config.platform == "ensemble":
                continue
            assert config.HasField("dynamic_batching") == (variant != "no_batching"), (variant, path)
    threads = parse_config((repos["preprocess_1_thread"] / "clip_image_preprocess" / "config.pbtxt").read_text())
    assert threads.parameters["threads"].string_value == "1"


def test_precision_goals_count_only_runners_within_the_gate() -> None:
    """benchmarks/precision.py's goal lines: a fast runner that failed parity (or whose ViT-B-32 cosine misses
    its class) never counts; the best runner inside the gate is judged at its worst batch >= 8; the served
    goal takes the best step against today's python-fp32."""
    from benchmarks import precision

    def runner(ratios: dict[str, float], cosine: float) -> dict:
        return {"batches": {b: {"speedup_vs_torch": r, "min_cosine_vs_torch": cosine} for b, r in ratios.items()}}

    towers = {
        "image": {
            precision.BASELINE: runner({"1": 1.0, "8": 1.0}, 1.0),
            "fast-but-wrong": runner({"1": 9.0, "8": 9.0}, 0.5),  # ViT-B-32 cosine below its class
            "failed-parity": runner({"1": 8.0, "8": 8.0}, 1.0),
            "good": runner({"1": 5.0, "8": 3.5, "32": 3.2}, 0.9999),
            "missing": {"skipped": "no library"},
        },
        "text": {precision.BASELINE: runner({"8": 1.0}, 1.0), "good": runner({"8": 2.5, "32": 4.0}, 0.9999)},
    }
    stages = {"fast-but-wrong": {"status": "pass", "threshold": 0.98}, "failed-parity": {"status": "fail"},
              "good": {"status": "pass", "threshold": 0.98}}
    served = {"runtimes": {precision.SERVED_BASELINE: {"clip_text": {"throughput": 10.0}},
                           "python-int8": {"clip_text": {"throughput": 18.0}},
                           "openvino-int8": {"clip_text": {"throughput": 25.0}}}}
    lines = precision.goals({"encoders": {"towers": towers}, "accuracy": {"stages": stages}, "served": served})
    image, text, served_text = lines
    assert "**MET**" in image and "`good`" in image and "3.20x" in image  # worst batch >= 8, not the best
    assert "**NOT MET**" in text and "2.50x" in text
    assert "**MET**" in served_text and "`openvino-int8`" in served_text and "2.50x" in served_text
    assert precision._gate({"stages": stages}, "fast-but-wrong", 0.5).startswith("fail (ViT-B-32 min cos")
