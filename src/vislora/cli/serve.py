"""`vislora serve`: one base model, many adapters, over HTTP (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vislora.cli.app import app, console
from vislora.errors import ConfigError


@app.command()
def serve(
    config: Annotated[Path | None, typer.Argument(help="Serve config YAML (see docs/serving.md). Optional when "
                                                       "--adapter gives adapters trained by `vislora train`.")] = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", help="NAME=DIR: load the adapter directory DIR as NAME (or NAME=registry:NAME@VERSION "
                                "from --registry); repeatable.")] = None,
    registry: Annotated[Path | None, typer.Option(help="Adapter registry root (vislora registry) for "
                                                       "registry:NAME@VERSION sources.")] = None,
    base: Annotated[str | None, typer.Option(
        help="Base model spec (timm:<name>, hf:<id or dir>, asset:dinov2-small); default: the base named by the "
             "first adapter's task.json.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Head width of a classifier --base (every adapter shares "
                                                         "it).")] = None,
    dual_encoder: Annotated[bool, typer.Option(help="--base is a dual encoder with both towers (hf:<CLIP or "
                                                     "SigLIP>, open_clip:<name>): embeds images and texts.")] = False,
    text: Annotated[str | None, typer.Option(help="Text encoder paired with an image --base into a dual encoder "
                                                  "(hf:<id or dir>, asset:all-minilm-l6-v2).")] = None,
    lm: Annotated[str | None, typer.Option(help="Causal LM joined to an image --base into a generative VLM "
                                                "(asset:smollm2-135m-instruct, hf:<id or dir>): POST /v1/generate "
                                                "answers.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side of --base; default: its native size.")] = None,
    random_init: Annotated[bool, typer.Option(help="Build --base with random weights (benchmarks, tests).")] = False,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    device: Annotated[str | None, typer.Option(help="Where the forward runs: auto (cuda when available, else mps, "
                                                    "else cpu), cpu, cuda, cuda:N, mps (config key `device`; "
                                                    "default cpu).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 (CPU or GPU) or float16 (GPU only) (config "
                                                   "key `dtype`; default float32).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config value: key.path=value (YAML); repeatable. Example: "
                      "--set batching.max_batch_size=32 --set batching.max_wait_ms=10")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Serve on Ray Serve (pip install 'vislora[ray]'): replicas "
                                                    "that are each one engine, requests placed by adapter; joins "
                                                    "the cluster at RAY_ADDRESS, else starts a local one.")] = False,
    replicas: Annotated[int | None, typer.Option(help="--ray: replicas (default 1).")] = None,
    max_adapters_per_replica: Annotated[int | None, typer.Option(
        help="--ray: adapters a replica keeps loaded; the least recently used beyond it is unloaded (default "
             "16).")] = None,
) -> None:
    """Serve predictions and embeddings of many adapters over one base model, micro-batched across adapters.

    Admin endpoints (load/unload adapters, change rollouts) need VISLORA_ADMIN_TOKEN in the environment; the live
    dashboard is at /dashboard, Prometheus metrics at /metrics, the OpenAPI schema at /openapi.json.

    Example: VISLORA_ADMIN_TOKEN=secret vislora serve -a cats=runs/cats/adapter -a dogs=runs/dogs/best --port 8080

    Example: vislora serve --registry adapters/ -a cats=registry:cats@promoted -a cats-next=registry:cats@latest

    Example (dual encoder: POST /v1/embed takes {"text": ...} too): vislora serve -a pets=runs/pets-clip/adapter

    Example (a generative VLM: POST /v1/generate): vislora serve --base asset:dinov2-small --lm
    asset:smollm2-135m-instruct --image-size 56 -a retail=runs/retail-vqa/adapter

    Example (a GPU, 16-bit weights): vislora serve -a cats=runs/cats/adapter --device cuda --dtype bfloat16

    Example (Ray Serve, 4 replicas reading one registry): vislora serve serve.yaml --ray --replicas 4
    """
    import uvicorn

    from vislora.serve import build_engine, create_app

    cfg = build_config(config, adapter or [], base, num_classes, image_size, random_init, host, port, set_ or [],
                       registry, text=text, dual_encoder=dual_encoder, device=device, dtype=dtype, lm=lm)
    if ray:
        from vislora.serve.ray import run

        console.print(f"serving on Ray Serve: {replicas or 1} replicas, API http://{cfg.host}:{cfg.port}/v1/predict")
        random = cfg.base is not None and not cfg.base.pretrained  # every replica must draw the same weights
        run(cfg, replicas or 1, max_adapters=max_adapters_per_replica or 16, base_seed=0 if random else None,
            blocking=True)
        return
    if replicas is not None or max_adapters_per_replica is not None:
        raise ConfigError("--replicas and --max-adapters-per-replica need --ray (one process serves without it)")
    engine = build_engine(cfg)
    size = f"{engine.input_spec.size} px" if engine.input_spec.size else "images of any size, tiled"
    names = ", ".join(a.name for a in engine.adapters()) or "none yet"
    console.print(f"serving {len(engine.adapters())} adapters over {engine.base.spec} "
                  f"({size}, {engine.placement.describe()}): {names}")
    if engine.placement.unused_gpu():
        console.print(f"[yellow]{engine.placement.unused_gpu()}[/]")
    console.print(f"dashboard http://{cfg.host}:{cfg.port}/dashboard  ·  API http://{cfg.host}:{cfg.port}/docs")
    if cfg.auth.admin() is None:
        console.print(f"[yellow]admin endpoints are off[/]: set {cfg.auth.admin_token_env} to load/unload adapters "
                      "over HTTP")
    uvicorn.run(create_app(engine, cfg), host=cfg.host, port=cfg.port, log_level="info")


def build_config(config: Path | None, adapters: list[str], base: str | None, num_classes: int | None,
                 image_size: int | None, random_init: bool, host: str | None, port: int | None,
                 overrides: list[str], registry: Path | None = None, *, text: str | None = None,
                 dual_encoder: bool = False, device: str | None = None, dtype: str | None = None,
                 lm: str | None = None) -> Any:
    """The ServeConfig from CONFIG (if given) with the command-line flags applied on top."""
    from vislora.io import apply_overrides
    from vislora.serve.config import ServeConfig, read_config
    from vislora.serve.sources import REGISTRY

    data = read_config(config) if config is not None else {}
    for item in adapters:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapter {item!r} is not NAME=DIR (example: --adapter cats=runs/cats/adapter)")
        data.setdefault("adapters", {})[name] = folder if folder.startswith(REGISTRY) else str(
            Path(folder).expanduser().resolve())
    if registry is not None:
        data["registry"] = str(registry.expanduser().resolve())
    if base is not None:
        data["base"] = {"spec": base, "image_size": image_size, "pretrained": not random_init}
        if lm is not None:
            data["base"].update(kind="generative", lm=lm)
        elif dual_encoder or text is not None:
            data["base"].update(kind="dual_encoder", text=text)
        elif num_classes is None:
            raise ConfigError("--base needs --num-classes (the head width every adapter shares), or --dual-encoder "
                              "/ --text for a dual encoder")
        else:
            data["base"]["num_classes"] = num_classes
    elif (num_classes is not None or image_size is not None or random_init or dual_encoder or text is not None
          or lm is not None):
        raise ConfigError("--num-classes, --image-size, --random-init, --dual-encoder, --text and --lm describe "
                          "--base; give --base too")
    data.update({k: v for k, v in {"host": host, "port": port, "device": device, "dtype": dtype}.items()
                 if v is not None})
    return ServeConfig.parse(apply_overrides(data, overrides))
