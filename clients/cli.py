"""`clip-triton embed | classify | search`: client commands, registered into the main app by `register(app)`.

Only typer and the standard library at import time: tritonclient and numpy load inside the commands,
so `clip-triton --help` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clip_triton.clients.cli_options import dataclass_options, option
from clip_triton.clients.contract import DEFAULT_PREFIX
from clip_triton.clients.errors import UsageError

if TYPE_CHECKING:
    from clip_triton.clients.sync import ClipClient

Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout instead of a table.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")]


def _headers(pairs: list[str] | None) -> dict[str, str]:
    headers = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--header expects KEY=VALUE, got {pair!r}")
        headers[key.strip().lower()] = value  # gRPC metadata keys must be lowercase
    return headers


@dataclass
class Connection:
    """Where the server is and how to talk to it: the options every client command takes, built once."""

    url: str = option(
        "127.0.0.1:8001",
        flags=("--url",),
        envvar="CLIP_TRITON_URL",
        help="Triton gRPC endpoint HOST:PORT, or replicas of one model HOST:PORT,HOST:PORT,... (requests are "
        "spread over them; a replica that fails is set aside and its requests retried on the others).",
    )
    prefix: str = option(DEFAULT_PREFIX, help="Model name prefix: the server serves PREFIX_image and PREFIX_text.")
    timeout: float = option(60.0, help="Seconds per request before giving up.")
    batch_size: int = option(16, help="Items per request (capped by the model's max_batch_size).")
    concurrency: int = option(4, help="Requests in flight at once, per endpoint.")
    retries: int = option(3, help="Retries per endpoint while all are unavailable (exponential backoff).")
    ssl: bool = option(False, flags=("--ssl",), help="Use TLS.")
    root_certs: Path | None = option(None, help="PEM root certificates (with --ssl).")
    private_key: Path | None = option(None, help="PEM client private key (with --ssl).")
    cert_chain: Path | None = option(None, help="PEM client certificate chain (with --ssl).")
    header: list[str] | None = option(None, flags=("--header",), help="KEY=VALUE gRPC metadata; repeatable.")
    preprocess: str = option(
        "server",
        flags=("--preprocess",),
        help="server: send encoded images (PREFIX_image decodes them); client: decode and crop here, with the "
        "server's code, and send uint8 pixels to PREFIX_image_pixels.",
    )

    def client(self) -> ClipClient:
        from clip_triton.clients.sync import ClipClient

        certs = (self.root_certs, self.private_key, self.cert_chain)
        return ClipClient(
            self.url,
            prefix=self.prefix,
            timeout=self.timeout,
            batch_size=self.batch_size,
            concurrency=self.concurrency,
            retries=self.retries,
            ssl=self.ssl or any(p is not None for p in certs),
            root_certificates=str(self.root_certs) if self.root_certs else None,
            private_key=str(self.private_key) if self.private_key else None,
            certificate_chain=str(self.cert_chain) if self.cert_chain else None,
            headers=_headers(self.header),
            preprocess=self.preprocess,
        )


@dataclass
class Skipping:
    """Whether a bulk command (`embed FOLDER`, `search`) leaves out the files that fail as their own fault."""

    skip_invalid: bool = option(
        False,
        flags=("--skip-invalid",),
        help="Leave out files that cannot be read, are not images, are truncated or corrupt, are over the size "
        "limits or that the server rejects, and list each with its reason (embed: DIR/rejected.jsonl; search: "
        "FOLDER/.clip-triton-rejected.jsonl) instead of stopping. Server down or timeouts still stop the run.",
    )


def _report_skipped(stage: str, count: int, listed: Path | None, first: list[tuple[str, str]]) -> None:
    """The one line a --skip-invalid run ends with when it left files out (stderr, shown even with --quiet)."""
    if not count:
        return
    files = f"{count} file{'' if count == 1 else 's'} skipped"
    where = f"see {listed}" if listed is not None else "; ".join(f"{path}: {why}" for path, why in first[:3])
    print(f"[{stage}] WARNING: {files}, {where}", file=sys.stderr, flush=True)


class _StderrProgress:
    """`[embed] 96/250 items` on stderr, at most once a second plus the last one; nothing for one request."""

    def __init__(self, stage: str, quiet: bool, what: str = "items") -> None:
        self.stage, self.quiet, self.what = stage, quiet, what
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.quiet or (done == total and self.last == 0.0):
            return  # finished at once: a progress line would be noise
        if done == total or now - self.last >= 1.0:
            self.last = now
            print(f"[{self.stage}] {done}/{total} {self.what}", file=sys.stderr, flush=True)


class _RateProgress:
    """`[embed] 1200/5000 images, 85.3 images/s, ETA 0:00:45` on stderr, at most once a second and at the end.

    The rate counts only what this run embeds: shards a resumed run finds done make `done` jump."""

    def __init__(self, quiet: bool, what: str = "images") -> None:
        self.quiet, self.what = quiet, what
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int, reused: int) -> None:
        now = time.monotonic()
        if self.quiet or (done < total and now - self.last < 1.0):
            return
        self.last = now
        rate = (done - reused) / max(now - self.start, 1e-9)
        eta = f", ETA {_clock((total - done) / rate)}" if rate > 0 and done < total else ""
        kept = f" ({reused} already done)" if reused else ""
        print(f"[embed] {done}/{total} {self.what}{kept}, {rate:.1f} {self.what}/s{eta}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


@dataclass_options
def embed(
    images: Annotated[
        list[str] | None,
        typer.Argument(help="Image files to embed, or one folder (streamed into --out DIR).", show_default=False),
    ] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to embed; repeatable.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write embeddings to FILE.npy (float32 [N, D]) or FILE.jsonl; for a folder, to DIR in shards "
            "(DIR/shard-00000.npy + .paths.txt, DIR/index.json), resuming what an earlier run left there."
        ),
    ] = None,
    shard_size: Annotated[int, typer.Option(help="Images per shard when a folder is embedded into --out DIR.")] = (
        10_000
    ),
    *,
    connection: Connection,
    skipping: Skipping,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Embed images (paths) or texts (--text) through the server; print them, or save .npy / .jsonl.

    A folder streams: walked lazily, written shard by shard into --out DIR, resumable after an interruption.
    """
    if bool(images) == bool(text):
        raise UsageError("give either image files or --text TEXT (one or more), not both and not neither")
    if images and any(Path(p).is_dir() for p in images):
        if len(images) != 1:
            raise UsageError("give one folder (embedded into --out DIR in shards) or image files, not both")
        if out is None or out.suffix.lower() in (".npy", ".jsonl"):
            raise UsageError("a folder is embedded in shards: give --out DIR (a folder, not .npy / .jsonl)")
        _embed_folder(connection.client(), Path(images[0]), out, shard_size, json_out, quiet, skipping.skip_invalid)
        return
    if skipping.skip_invalid:
        raise UsageError("--skip-invalid applies to a folder embedded into --out DIR (and to search), not to files")
    if out is not None and out.suffix.lower() not in (".npy", ".jsonl"):
        raise UsageError(f"--out must end in .npy or .jsonl, got {out.name}")
    if out is not None:
        from clip_triton.clients.files import check_writable_parent

        check_writable_parent(out)
    client = connection.client()
    with client:
        info = client.model_info
        if images:
            labels = list(images)
            vectors = client.embed_images(labels, progress=_StderrProgress("embed", quiet, "images"))
        else:
            labels = list(text or [])
            vectors = client.embed_texts(labels, progress=_StderrProgress("embed", quiet, "texts"))
    kind = "image" if images else "text"
    if out is not None:
        _write_embeddings(out, labels, vectors, kind)
        summary = {
            "out": str(out),
            "count": int(vectors.shape[0]),
            "dim": int(vectors.shape[1]),
            "kind": kind,
            "model": info.image.model if images else info.text.model,
        }
        typer.echo(
            json.dumps(summary)
            if json_out
            else f"wrote {vectors.shape[0]} x {vectors.shape[1]} {kind} embeddings to {out}"
        )
        return
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "model": info.image.model if images else info.text.model,
                    "dim": int(vectors.shape[1]),
                    "items": [
                        {kind: label, "embedding": [float(v) for v in row]}
                        for label, row in zip(labels, vectors, strict=True)
                    ],
                }
            )
        )
        return
    rows = [
        [str(i), label, str(row.shape[0]), " ".join(f"{v:+.4f}" for v in row[:4]) + " ..."]
        for i, (label, row) in enumerate(zip(labels, vectors, strict=True))
    ]
    typer.echo(_table(rows, ["#", kind, "dim", "embedding"]))


def _embed_folder(
    client: ClipClient, folder: Path, out: Path, shard_size: int, json_out: bool, quiet: bool, skip_invalid: bool
) -> None:
    from clip_triton.clients.files import check_writable_parent
    from clip_triton.clients.stream import REJECTED_NAME, embed_folder

    check_writable_parent(out / "index.json")

    def notice(line: str) -> None:  # damage found and dealt with: shown even with --quiet
        print(f"[embed] WARNING: {line}", file=sys.stderr, flush=True)

    with client:
        result = embed_folder(
            client,
            folder,
            out,
            shard_size=shard_size,
            progress=_RateProgress(quiet),
            notice=notice,
            skip_invalid=skip_invalid,
        )
        model = client.model_info.image.model
    rejected_file = out / REJECTED_NAME if result.rejected else None
    summary = {
        "out": str(out),
        "count": result.count,
        "dim": result.dim,
        "kind": "image",
        "model": model,
        "shards": result.shards,
        "reused_shards": result.reused_shards,
        "redone_shards": len(result.damaged),
        "embedded": result.embedded,
        "skipped": len(result.skipped),
    }
    if skip_invalid:
        summary |= {"rejected": len(result.rejected), "rejected_now": result.rejected_now,
                    "rejected_file": None if rejected_file is None else str(rejected_file)}
    _report_skipped("embed", len(result.rejected), rejected_file, result.rejected)
    redone = f"{len(result.damaged)} damaged and embedded again, " if result.damaged else ""
    typer.echo(
        json.dumps(summary)
        if json_out
        else f"wrote {result.count} x {result.dim} image embeddings to {out} in {result.shards} shard(s) "
        f"({result.reused_shards} kept from an earlier run, {redone}{result.embedded} images embedded now)"
    )


def _write_embeddings(out: Path, labels: list[str], vectors: Any, kind: str) -> None:
    import numpy as np

    from clip_triton.clients.files import staged_path

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_path(out) as tmp:
        if out.suffix.lower() == ".npy":
            with open(tmp, "wb") as handle:  # a file object: np.save would append ".npy" to the temp name
                np.save(handle, vectors.astype(np.float32))
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for label, row in zip(labels, vectors, strict=True):
                    handle.write(json.dumps({kind: label, "embedding": [float(v) for v in row]}) + "\n")


@dataclass_options
def classify(
    images: Annotated[list[str], typer.Argument(help="Image files to classify.", show_default=False)],
    labels: Annotated[str, typer.Option(help="Comma-separated class names, e.g. cat,dog,car.")],
    top: Annotated[int, typer.Option(help="Labels shown per image.")] = 3,
    template: Annotated[
        list[str] | None, typer.Option("--template", help="Prompt template with {} for the label; repeatable.")
    ] = None,
    *,
    connection: Connection,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Zero-shot classification of images against --labels (prompt-ensembled, the model's logit scale)."""
    from clip_triton.clients._core import DEFAULT_TEMPLATES

    names = [name.strip() for name in labels.split(",") if name.strip()]
    if not names:
        raise UsageError("--labels needs at least one name, e.g. --labels cat,dog")
    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    client = connection.client()
    with client, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probs = client.classify(
            images, names, template or DEFAULT_TEMPLATES, progress=_StderrProgress("classify", quiet, "images")
        )
    for warning in caught:  # the library's warnings, in our one-line format
        print(f"[classify] WARNING: {warning.message}", file=sys.stderr, flush=True)
    k = min(top, len(names))
    results: list[dict[str, Any]] = []
    for image, row in zip(images, probs, strict=True):
        order = sorted(range(len(names)), key=lambda j: -float(row[j]))[:k]
        results.append({"image": image, "top": [{"label": names[j], "prob": float(row[j])} for j in order]})
    if json_out:
        typer.echo(json.dumps(results))
        return
    rows = []
    for result in results:
        for rank, hit in enumerate(result["top"]):
            rows.append([result["image"] if rank == 0 else "", hit["label"], f"{hit['prob']:.4f}"])
    typer.echo(_table(rows, ["image", "label", "prob"]))


@dataclass_options
def search(
    images: Annotated[Path, typer.Option("--images", help="Folder of images (searched recursively).")],
    query: Annotated[str, typer.Option(help="Text to search for.")],
    top: Annotated[int, typer.Option(help="Results shown.")] = 5,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write FOLDER/.clip-triton-cache.npz.")
    ] = False,
    *,
    connection: Connection,
    skipping: Skipping,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Rank a folder's images by similarity to --query; embeddings are cached next to the folder."""
    from clip_triton.clients._core import ranking
    from clip_triton.clients.search import describe_skipped, image_files, index_folder, relative

    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    image_files(images)  # a missing folder fails before connecting
    client = connection.client()
    with client:
        index = index_folder(
            client,
            images,
            use_cache=not no_cache,
            progress=_StderrProgress("search", quiet, "images"),
            skip_invalid=skipping.skip_invalid,
        )
        if index.skipped:  # a warning: shown even with --quiet
            print(f"[search] WARNING: {describe_skipped(index.skipped, images)}", file=sys.stderr, flush=True)
        if not quiet:
            print(
                f"[search] {len(index.paths)} images: {index.reused} from the cache, {index.embedded} embedded",
                file=sys.stderr,
                flush=True,
            )
        query_vec = client.embed_texts([query])[0]
    left_out = [(relative(path, images), why) for path, why in index.rejected]
    _report_skipped("search", len(left_out), index.rejected_file, left_out)
    hits = ranking(query_vec, index.embeddings, top)
    results: list[dict[str, Any]] = [
        {"rank": r + 1, "score": hit.score, "path": str(index.paths[hit.index])} for r, hit in enumerate(hits)
    ]
    if json_out:
        answer = {"query": query, "results": results, "cached": index.reused, "embedded": index.embedded}
        if skipping.skip_invalid:
            file = None if index.rejected_file is None else str(index.rejected_file)
            answer |= {"rejected": [{"path": p, "reason": why} for p, why in left_out], "rejected_file": file}
        typer.echo(json.dumps(answer))
        return
    typer.echo(_table([[str(h["rank"]), f"{h['score']:.4f}", h["path"]] for h in results], ["rank", "score", "path"]))


def register(app: typer.Typer) -> None:
    """Add the client commands to the main `clip-triton` app."""
    app.command()(embed)
    app.command()(classify)
    app.command()(search)
