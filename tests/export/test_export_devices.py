"""Where an export's onnxruntime checks run (--device), and Triton GPU instance groups (--triton-gpus)."""

import onnx
import onnxruntime as ort
import pytest
import torch
from export_helpers import dinov2_run
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from vislora.cli import app
from vislora.errors import ConfigError, ExportError, VisloraWarning
from vislora.export import export_onnx_dir
from vislora.export.common import INPUT_NAME, OUTPUT_NAME
from vislora.export.onnx import check_onnx
from vislora.export.runtime import CPU, CUDA, inference_session, providers
from vislora.export.triton import config_pbtxt
from vislora.export.triton_config import parse_gpus

GROUP = model_config_pb2.ModelInstanceGroup
HAS_CUDA_PROVIDER = CUDA in ort.get_available_providers()


def test_providers_for_each_device():
    with_gpu = [CUDA, CPU]
    assert providers("cpu", with_gpu) == [CPU]
    assert providers("auto", [CPU]) == [CPU]  # auto falls back silently
    assert providers("auto", with_gpu) == [(CUDA, {"device_id": 0, "use_tf32": 0}), CPU]
    assert providers("cuda:1", with_gpu) == [(CUDA, {"device_id": 1, "use_tf32": 0}), CPU]
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        providers("gpu0", with_gpu)


def test_cuda_without_the_cuda_provider_falls_back_to_the_cpu_with_a_warning():
    with pytest.warns(VisloraWarning, match=r"device 'cuda' asked for the ONNX checks, but onnxruntime offers "
                                            r"\['CPUExecutionProvider'\] \(no CUDAExecutionProvider\): they run on "
                                            r"the CPU; install onnxruntime-gpu"):
        assert providers("cuda", [CPU]) == [CPU]


def linear_onnx(model: torch.nn.Sequential, path):
    """The ONNX graph of Flatten -> Linear written by hand with onnx.helper (no torch.onnx export: seconds here)."""
    linear = model[1]
    weight = onnx.numpy_helper.from_array(linear.weight.detach().numpy(), "weight")
    bias = onnx.numpy_helper.from_array(linear.bias.detach().numpy(), "bias")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1),
         onnx.helper.make_node("Gemm", ["flat", "weight", "bias"], [OUTPUT_NAME], transB=1)],
        "linear", [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", 4])], [weight, bias])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="onnxruntime here has the CUDA provider")
def test_check_onnx_on_cuda_without_the_provider_runs_on_the_cpu(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    linear_onnx(model, tmp_path / "m.onnx")
    with pytest.warns(VisloraWarning, match="they run on the CPU"):
        assert inference_session(tmp_path / "m.onnx", "cuda").get_providers() == [CPU]
    with pytest.warns(VisloraWarning):
        assert check_onnx(model, tmp_path / "m.onnx", 8, device="cuda").worst < 1e-5


def parse(text):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize(("gpus", "kind", "listed"), [(None, GROUP.KIND_CPU, []), ((), GROUP.KIND_GPU, []),
                                                      ((0, 1), GROUP.KIND_GPU, [0, 1])])
def test_triton_instance_groups_parse_as_triton_model_configs(gpus, kind, listed):
    config = parse(config_pbtxt("m", 32, [3], 4, [1], labels=False, gpus=gpus))
    (group,) = config.instance_group
    assert (group.kind, list(group.gpus), group.count) == (kind, listed, 1)


def test_triton_gpus_option_text():
    assert parse_gpus(None) is None and parse_gpus("") is None
    assert parse_gpus("all") == () and parse_gpus("0,1") == (0, 1) and parse_gpus("3") == (3,)
    with pytest.raises(ExportError, match=r"--triton-gpus 'gpu0' is not a list of GPU indices; use e.g. 0 or 0,1"):
        parse_gpus("gpu0")
    with pytest.raises(ExportError, match="must be distinct and >= 0"):
        parse_gpus("1,1")


def test_export_triton_command_reads_triton_gpus_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["export", "triton", "--adapter", str(tmp_path / "no-run"), "--repo",
                                      str(tmp_path / "models"), "--name", "m", "--triton-gpus", "0,x"])
    assert isinstance(result.exception, ExportError)
    assert "--triton-gpus '0,x' is not a list of GPU indices" in str(result.exception)
    assert not (tmp_path / "models").exists()


@pytest.mark.gpu
def test_onnx_export_checked_on_cuda_equals_pytorch(tmp_path):
    if not HAS_CUDA_PROVIDER:
        pytest.skip("onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu)")
    result = export_onnx_dir(dinov2_run(), tmp_path / "onnx", device="cuda")
    assert result.check.worst <= 1e-4
    assert inference_session(result.model, "cuda").get_providers()[0] == CUDA
