"""PNG plots of results.json (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402


def _integer_ticks(ax: Any, values: list[int]) -> None:
    if values:
        ax.set_xticks(values)
        ax.set_xticklabels([str(v) for v in values])
        ax.minorticks_off()


def encoder_plot(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per model: throughput vs batch size per runtime, image and text side by side."""
    files = []
    for model, data in results.get("encoders", {}).get("models", {}).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, tower in zip(axes, ("image", "text"), strict=True):
            for entry in data["towers"][tower].values():
                points = [(int(b), c["throughput"]) for b, c in entry["batches"].items() if "throughput" in c]
                if points:
                    xs, ys = zip(*sorted(points), strict=True)
                    ax.plot(xs, ys, marker="o", label=entry["label"])
            ax.set_xscale("log", base=2)
            _integer_ticks(ax, sorted({int(b) for e in data["towers"][tower].values() for b in e["batches"]}))
            ax.set_xlabel("batch size")
            ax.set_ylabel("items / s")
            ax.set_title(f"{model} {tower} encoder")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Encoder throughput by batch ({results['machine']['cpu_model']}, "
                     f"{results['encoders']['threads']['ort.intra_op_num_threads']} threads)", fontsize=9)
        fig.tight_layout()
        path = out / f"encoders_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def load_plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Throughput and latency (p50, p99) vs concurrency, with and without dynamic batching."""
    load = results.get("load")
    if not load or not load.get("variants"):
        return []
    models = sorted({m for v in load["variants"].values() for m in v if isinstance(v[m], dict)})
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        for index, (variant, data) in enumerate(load["variants"].items()):
            colour = f"C{index}"
            levels = data.get(model, {}).get("levels", [])
            if not levels:
                continue
            xs = [lv["concurrency"] for lv in levels]
            axes[0][col].plot(xs, [lv["throughput"] for lv in levels], marker="o", color=colour, label=variant)
            axes[1][col].plot(xs, [lv["median_ms"] for lv in levels], marker="o", color=colour,
                                label=f"{variant} p50")
            axes[1][col].plot(xs, [lv["p99_ms"] for lv in levels], marker="x", linestyle="--", color=colour,
                                label=f"{variant} p99")
        axes[0][col].set_title(f"{model}: throughput")
        axes[0][col].set_ylabel("requests / s")
        axes[1][col].set_title(f"{model}: latency")
        axes[1][col].set_ylabel("ms")
        axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            _integer_ticks(ax, load.get("concurrency", []))
            ax.set_xlabel("concurrency (requests in flight)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Triton over gRPC, {load['model']}, {load['runtime']}", fontsize=9)
    fig.tight_layout()
    path = out / "load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def preprocess_plot(results: dict[str, Any], out: Path) -> list[Path]:
    pre = results.get("preprocess", {}).get("images")
    if not pre:
        return []
    rows = pre["images"]
    paths = list(rows[0]["paths"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(paths)
    for i, path in enumerate(paths):
        ax.bar([j + i * width for j in range(len(rows))], [r["paths"][path]["median_ms"] for r in rows], width,
               label=path)
    ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["name"].removeprefix("builtin-") for r in rows], rotation=60, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (one instance)")
    ax.set_title("Server preprocessing: exact (default) vs draft / reduce decode (opt-in, not bit-exact)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "preprocess.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def memory_plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Peak RSS per stage against the largest tower's FP32 weights, with the bound 3 x W_tower + 3 GiB."""
    mem = results.get("memory")
    models = {m: e for m, e in (mem or {}).get("models", {}).items() if e.get("w_tower_max_gib")}
    if not models:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"export": "o", "fp16": "s", "repository": "^", "parity": "D"}
    for index, (stage, marker) in enumerate(markers.items()):
        points = [(e["w_tower_max_gib"], e["stages"][stage]["peak_gib"]) for e in models.values()
                  if stage in e["stages"] and e["stages"][stage].get("peak_gib") is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, marker=marker, color=f"C{index}", label=stage)
    top = max(e["w_tower_max_gib"] for e in models.values()) * 1.1 + 0.1
    ax.plot([0, top], [3.0, 3 * top + 3.0], color="black", linestyle="--", label="bound: 3 x W_tower + 3 GiB")
    for name, e in models.items():
        ax.annotate(name, (e["w_tower_max_gib"], e.get("bound_gib", 0)), fontsize=6, rotation=30,
                    textcoords="offset points", xytext=(2, 4))
    ax.set_xlabel("largest tower's FP32 weights, W_tower (GiB)")
    ax.set_ylabel("peak RSS of the stage's process (GiB)")
    ax.set_title("Peak memory per stage vs model size (random weights, each stage its own process)", fontsize=9)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    return encoder_plot(results, out) + load_plot(results, out) + preprocess_plot(results, out) + memory_plot(
        results, out
    )
