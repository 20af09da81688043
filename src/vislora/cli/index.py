"""`vislora index build|query|info`: visual search over an image folder or manifest with a trained adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vislora.cli.app import app, console
from vislora.errors import ConfigError

index_app = typer.Typer(help="Visual search: embed images with an adapter into an index, query it with a text or "
                             "an image.", no_args_is_help=True)
app.add_typer(index_app, name="index")


def _device(device: str) -> str:
    """The torch device --device names (vislora.devices: auto = cuda, else mps, else cpu; refused if absent)."""
    from vislora.devices import resolve_device

    return str(resolve_device(device))


@index_app.command("build")
def index_build(
    data: Annotated[str, typer.Argument(help="Image folder, .csv/.jsonl manifest (other columns travel as metadata), "
                                             "or fashion-mnist:test.")],
    adapter: Annotated[str, typer.Option(help="The run whose model embeds: RUN/adapter, RUN/best, or "
                                              "registry:NAME@VERSION with --registry.")],
    out: Annotated[Path, typer.Option(help="Index folder to write (replaced atomically if it holds an index).")],
    base: Annotated[bool, typer.Option("--base", help="Embed with the adapter switched off (the base model's "
                                                      "embeddings), to compare base and adapted search.")] = False,
    registry: Annotated[Path | None, typer.Option(help="Adapter registry root for registry:NAME@VERSION.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = 4,
    device: Annotated[str, typer.Option(help="auto (cuda when available, else mps, else cpu), cpu, cuda, cuda:N, "
                                              "mps.")] = "auto",
    limit: Annotated[int | None, typer.Option(help="Index a random subset of this many images.")] = None,
    label_column: Annotated[str, typer.Option(help="Manifest column holding the label ('' for none: then a "
                                                   "caption column is needed).")] = "label",
    path_column: Annotated[str, typer.Option(help="Manifest column holding the image path.")] = "path",
) -> None:
    """Embed every image of DATA with ADAPTER and save an index (vectors, rows, header with the adapter's sha256).

    A dual-encoder run (contrastive / few_shot) embeds into its joint space: text and image queries both work. A
    classifier run embeds the features its head reads: image queries only.

    Example: vislora index build catalogue/ --adapter runs/products-clip/adapter --out catalogue.index
    """
    from rich.progress import track

    from vislora.search import build_index

    report = build_index(data, adapter, out, registry=registry, base=base, batch_size=batch_size, workers=workers,
                         device=_device(device), label_column=label_column or None, path_column=path_column,
                         limit=limit, progress=lambda items, total: track(items, total=total, console=console,
                                                                          description="embedding images"))
    console.print(f"indexed {report.count:,} images x {report.dim} ({report.embedding} embeddings"
                  f"{', base model' if base else ''}) into {escape(str(report.path))}"
                  + (f"; {report.skipped} unreadable images skipped" if report.skipped else ""))
    console.print(f"{report.images_per_s:,.1f} images/s ({report.seconds:.1f} s)")


@index_app.command("query")
def index_query(
    index: Annotated[Path, typer.Argument(help="An index folder written by `vislora index build`.")],
    text: Annotated[str | None, typer.Option(help="Search with this text (dual-encoder indexes).")] = None,
    image: Annotated[Path | None, typer.Option(help="Search with this image file.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Rows to return.", min=1)] = 10,
    adapter: Annotated[str | None, typer.Option(
        help="Adapter to embed the query with (default: the one the index was built with); it must be the same "
             "version: its files are hashed and compared with the index.")] = None,
    registry: Annotated[Path | None, typer.Option(help="Adapter registry root for registry:NAME@VERSION.")] = None,
    backend: Annotated[str, typer.Option(help="auto (faiss when installed), faiss or torch.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
) -> None:
    """The top-k images of INDEX for a text or an image: rank, cosine score, path.

    Example: vislora index query catalogue.index --text "a red summer dress" -k 5
    """
    from vislora.search import load_index, query

    if (text is None) == (image is None):
        raise ConfigError("give exactly one of --text and --image")
    loaded = load_index(index, backend=backend)  # type: ignore[arg-type]
    hits = query(loaded, text=text, image=image, k=k, adapter=adapter, registry=registry)
    if as_json:
        typer.echo(json.dumps({"index": str(index), "query": {"text": text} if text is not None else
                               {"image": str(image)}, "hits": [h.to_dict() for h in hits]}, indent=2))
        return
    table = Table("rank", "score", "path", "label", title=escape(loaded.describe()))
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", escape(hit.path), escape(hit.describe_labels() or ""))
    console.print(table)


@index_app.command("info")
def index_info(
    index: Annotated[Path, typer.Argument(help="An index folder written by `vislora index build`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole header as JSON.")] = False,
) -> None:
    """What an index holds: rows, width, embedding kind, base model, the adapter (sha256) it was built with."""
    from vislora.search import read_header

    header = read_header(index)
    if as_json:
        typer.echo(json.dumps(header, indent=2))
        return
    adapter = header.get("adapter")
    console.print(f"{header['count']:,} images x {header['dim']} ({header['embedding']} embeddings; queries: "
                  f"{', '.join(header.get('modalities', []))})", markup=False)
    console.print(f"base model: {header['base']['spec']}", markup=False)
    console.print(f"adapter: {adapter['label']} (sha256 {adapter['sha256']})" if adapter else
                  "adapter: none (base-model embeddings)", markup=False)
    console.print(f"data: {header.get('data')}; built {header.get('built_at')}", markup=False)
