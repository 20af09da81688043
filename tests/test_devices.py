"""vislora.devices: device and dtype names, their errors, and placing a model and its inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vislora.devices import Placement, check_device_name, resolve_device, resolve_dtype
from vislora.errors import ConfigError


def test_auto_picks_cuda_then_mps_then_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_cpu_and_dtypes() -> None:
    placement = Placement.resolve("cpu", "bfloat16")
    assert placement == Placement(torch.device("cpu"), torch.bfloat16)
    assert placement.describe() == "cpu bfloat16"
    assert placement.is_cpu and not placement.is_cuda
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32


@pytest.mark.parametrize("name", ["gpu:0", "cuda:", "cuda:x", "CPU", "tpu", "cuda:0:1", ""])
def test_bad_device_names(name: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown device .*use auto, cpu, cuda, cuda:N or mps"):
        check_device_name(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_names_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda:1")
    assert str(info.value).startswith("device 'cuda:1' asked, but torch sees no CUDA GPU here "
                                      "(torch.cuda.is_available() is False")
    assert "use --device cpu (or auto)" in str(info.value)


def test_float16_on_cpu_is_refused_naming_bfloat16() -> None:
    with pytest.raises(ConfigError, match=r"dtype float16 on the CPU is refused.*use --dtype bfloat16"):
        Placement.resolve("cpu", "float16")
    with pytest.raises(ConfigError, match="unknown dtype 'half': use float32, bfloat16, float16"):
        Placement.resolve("cpu", "half")


def test_place_casts_weights_and_inputs_keep_integers() -> None:
    placement = Placement.resolve("cpu", "bfloat16")
    model = placement.place(nn.Linear(4, 3))
    assert model.weight.dtype is torch.bfloat16
    pixels = placement.batch([torch.ones(3, 2, 2), torch.zeros(3, 2, 2)])
    assert pixels.shape == (2, 3, 2, 2) and pixels.dtype is torch.bfloat16
    assert torch.equal(pixels[0].float(), torch.ones(3, 2, 2))
    ids = placement.inputs(torch.tensor([[1, 2]]))
    assert ids.dtype is torch.int64


@pytest.mark.gpu
def test_cuda_batch_goes_through_pinned_memory_and_matches_cpu() -> None:
    placement = Placement.resolve("cuda", "float16")
    samples = [torch.randn(3, 8, 8) for _ in range(4)]
    batch = placement.batch(samples)
    placement.synchronize()
    assert batch.device.type == "cuda" and batch.dtype is torch.float16
    assert torch.allclose(batch.float().cpu(), torch.stack(samples), atol=1e-2)
    assert placement.inputs(torch.ones(2)).device.type == "cuda"
