"""Ship an adapter: merged checkpoints, ONNX, static INT8 with calibration images, a Triton model repository;
for dual-encoder runs both towers (`vislora.export.dual`)."""

from vislora.errors import ExportError
from vislora.export.common import load_exportable, staged_dir
from vislora.export.dual import DualOnnxExport, load_dual_exportable
from vislora.export.dual_triton import DualTritonExport
from vislora.export.merge import MERGE_ATOL, MergeResult, merge_adapter
from vislora.export.onnx import ONNX_ATOL, ONNX_RTOL, OnnxCheck, check_onnx, export_onnx
from vislora.export.pipeline import OnnxExport, export_onnx_dir, prepare_int8
from vislora.export.quantize import QuantizeReport, quantize_int8
from vislora.export.triton import TritonExport, check_model_dir, config_pbtxt, export_triton

__all__ = [
    "MERGE_ATOL",
    "ONNX_ATOL",
    "ONNX_RTOL",
    "DualOnnxExport",
    "DualTritonExport",
    "ExportError",
    "MergeResult",
    "OnnxCheck",
    "OnnxExport",
    "QuantizeReport",
    "TritonExport",
    "check_model_dir",
    "check_onnx",
    "config_pbtxt",
    "export_onnx",
    "export_onnx_dir",
    "export_triton",
    "load_dual_exportable",
    "load_exportable",
    "merge_adapter",
    "prepare_int8",
    "quantize_int8",
    "staged_dir",
]
