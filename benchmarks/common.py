"""Shared pieces of the benchmark scripts: interleaved timing, train/inference steps, PEFT weight copies."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vislora


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest |a(x) - b(x)| in eval mode."""
    a.eval()
    b.eval()
    with torch.inference_mode():
        return (a(x) - b(x)).abs().max().item()


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], steps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each contender; round i runs them all once, starting at a rotated position,
    so drift in machine load hits all of them alike."""
    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                samples[name].append(elapsed)
    return samples


def train_step_fn(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    """One AdamW step of cross-entropy on (x, labels) over the model's trainable parameters."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def inference_fn(model: nn.Module, x: torch.Tensor, **kwargs: object) -> Callable[[], torch.Tensor]:
    model.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x, **kwargs)

    return run


def randomize_peft(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero lora_B (and DoRA magnitudes off ||W||) so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=gen))
    return model


def copy_from_peft(model: vislora.AdaptedModel, reference: nn.Module, peft_name: str = "default",
                   name: str = "default") -> None:
    """Give vislora adapter `name` the weights of PEFT adapter `peft_name` (same targets, whole weights)."""
    modules = dict(reference.base_model.model.named_modules())
    layers = [(path, layer) for path, layer in model.layers().items() if name in layer.adapters]
    if len(layers) != sum(1 for m in modules.values() if hasattr(m, "lora_A") and peft_name in m.lora_A):
        raise RuntimeError("vislora and PEFT adapted a different number of layers; the comparison is unfair")
    with torch.no_grad():
        for path, layer in layers:
            source = modules[path]
            layer.adapters[name].lora_A.copy_(source.lora_A[peft_name].weight)  # [r, in]
            layer.adapters[name].lora_B.copy_(source.lora_B[peft_name].weight)  # [out, r]
            if hasattr(layer.adapters[name], "lora_magnitude"):
                layer.adapters[name].lora_magnitude.copy_(source.lora_magnitude_vector[peft_name].weight)  # [out]


def print_table(samples: dict[str, list[float]], baseline_of: dict[str, str]) -> dict[str, float]:
    """Median ms per contender and its ratio to its baseline; returns the medians in seconds."""
    medians = {name: statistics.median(s) for name, s in samples.items()}
    width = max(len(name) for name in medians)
    print(f"\n{'name':<{width}}  {'median_ms':>10}  {'ratio':>6}  {'min_ms':>8}  {'max_ms':>8}  against")
    for name, seconds in medians.items():
        base = baseline_of[name]
        low, high = min(samples[name]) * 1e3, max(samples[name]) * 1e3
        print(f"{name:<{width}}  {seconds * 1e3:>10.1f}  {seconds / medians[base]:>6.3f}  {low:>8.1f}  "
              f"{high:>8.1f}  {base}")
    return medians


def random_adapters(args: Any, folder: Path, count: int, targets: list[str], seed: int = 0) -> list[Path]:
    """`count` adapter directories a000, a001, ... for the timm `args.model` (args.classes, args.image_size,
    args.rank): LoRA on `targets` plus the head, adapter i with seeded random tensors (seed 1000 + i)."""
    import timm

    torch.manual_seed(seed)
    base = timm.create_model(args.model, pretrained=False, num_classes=args.classes, img_size=args.image_size)
    model = vislora.inject(base, vislora.AdapterConfig(rank=args.rank, alpha=2 * args.rank, targets=targets,
                                                       modules_to_save=["head"]))
    dirs = []
    for i in range(count):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for param in model.adapter_parameters("default"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        dirs.append(vislora.save_adapter(model, folder / f"a{i:03d}", "default"))
    return dirs


def wait_ready(process: subprocess.Popen, url: str, name: str = "server", timeout: float = 300.0) -> None:
    """Return once `url`/readyz answers 200; exit naming `name` if its process exits or the timeout passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # waiting for the child to listen, bounded
        if process.poll() is not None:
            sys.exit(f"error: {name} exited:\n{process.stderr.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit(f"error: {name} was not ready after {timeout} s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a child server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


VLM_MODELS = ("smollm2", "tiny")


def bench_vlm(name: str, image_size: int = 56) -> Any:
    """A generative VLM for the benchmarks: `smollm2` is the real one (DINOv2-S + SmolLM2-135M-Instruct, cached
    assets), `tiny` a 2-layer DINOv2 + 2-layer Llama with random weights and SmolLM2's tokenizer (seconds to build)."""
    from transformers import AutoTokenizer, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from vislora.assets import resolve_model_spec
    from vislora.data.transforms import model_input_spec
    from vislora.vlm import IMAGE_TOKEN, ChatLayout, Vlm, VlmProcessor, build_vlm, compose_llava, family_of

    lm = "asset:smollm2-135m-instruct"
    if name == "smollm2":
        return build_vlm("asset:dinov2-small", lm=lm, image_size=image_size)
    if name != "tiny":
        raise SystemExit(f"error: unknown VLM {name!r}; use one of {', '.join(VLM_MODELS)}")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_spec(lm, "lm")[3:])
    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                      patch_size=14, image_size=image_size)).eval()
    causal = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True)).eval()
    model, image_tokens = compose_llava(vision, causal, tokenizer, image_size=image_size)
    processor = VlmProcessor(tokenizer, ChatLayout(IMAGE_TOKEN, image_tokens),
                             image_token_id=model.config.image_token_id)
    return Vlm(model.eval(), processor, model_input_spec(vision, image_size), family_of(model),
               {"spec": "tiny", "image_tokens": image_tokens})


def fashion_pixels(vlm: Any, images: Any) -> torch.Tensor:
    """Fashion-MNIST items (uint8 [N, 28, 28]) as the VLM's normalised RGB pixel_values [N, 3, side, side]."""
    from PIL import Image

    from vislora.data.transforms import build_transform

    transform = build_transform(vlm.image_spec, train=False)
    return torch.stack([transform(Image.fromarray(item).convert("RGB")) for item in images])
