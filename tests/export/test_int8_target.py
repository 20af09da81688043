"""INT8 settings that suit the CPU: /proc/cpuinfo parsed per instruction set, settings per target, 7-bit weights
really written, the saturation they avoid observed on this CPU, and the choice recorded in int8_report.json."""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_helpers import data_dirs, dinov2_run, int8_export
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from vislora.cli import app
from vislora.errors import ExportError
from vislora.export import export_onnx_dir, load_exportable, quantize_int8
from vislora.export.calibration import CalibrationReader, open_images
from vislora.export.int8_target import SETTINGS, int8_settings, parse_cpuinfo, this_cpu

EPYC_AVX2 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 23
model		: 49
model name	: AMD EPYC 7B12
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq \
pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm \
cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase \
tsc_adjust bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat \
npt nrip_save umip rdpid
bugs		: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass retbleed smt_rsb

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B12
flags		: fpu avx2 avx512_vnni
"""
SKYLAKE_AVX512 = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz
flags		: fpu sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
ICELAKE_VNNI = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: fpu sse4_2 avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vbmi avx512_vnni \
avx512_bitalg avx512_vpopcntdq
"""
ALDERLAKE_AVX_VNNI = """processor	: 0
model name	: 12th Gen Intel(R) Core(TM) i7-12700K
flags		: fpu sse4_2 avx fma avx2 avx_vnni
"""
SAPPHIRE_RAPIDS_AMX = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8488C
flags		: fpu avx2 avx512f avx512bw avx512vl avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40
CPU revision	: 1
"""
GRAVITON2 = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU part	: 0xd0c
"""
CORTEX_A72 = """processor	: 0
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU part	: 0xd08
"""
POWER9 = """processor	: 0
cpu		: POWER9 (architected), altivec supported
clock		: 2200.000000MHz
"""


@pytest.mark.parametrize(("text", "machine", "model", "isa", "target"), [
    (EPYC_AVX2, "x86_64", "AMD EPYC 7B12", "avx2", "avx2"),  # the second processor's flags are not read
    (SKYLAKE_AVX512, "x86_64", "Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz", "avx512bw", "avx512"),
    (ICELAKE_VNNI, "x86_64", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "avx512_vnni", "vnni"),
    (ALDERLAKE_AVX_VNNI, "x86_64", "12th Gen Intel(R) Core(TM) i7-12700K", "avx_vnni", "vnni"),
    (SAPPHIRE_RAPIDS_AMX, "x86_64", "Intel(R) Xeon(R) Platinum 8488C", "amx_int8", "vnni"),
    (GRAVITON3, "aarch64", "ARM implementer 0x41 part 0xd40", "arm64_i8mm", "arm64"),
    (GRAVITON2, "aarch64", "ARM implementer 0x41 part 0xd0c", "arm64_dotprod", "arm64"),
    (CORTEX_A72, "aarch64", "ARM implementer 0x41 part 0xd08", "arm64", "arm64"),
    (POWER9, "ppc64le", "POWER9 (architected), altivec supported", "unknown", "portable"),
])
def test_cpuinfo_names_the_int8_instruction_set(text, machine, model, isa, target):
    cpu = parse_cpuinfo(text, machine)
    assert (cpu.model, cpu.arch, cpu.isa, cpu.target) == (model, machine, isa, target)


def test_cpuinfo_flags_seen_are_listed_best_first():
    assert parse_cpuinfo(SAPPHIRE_RAPIDS_AMX, "x86_64").int8_flags == (
        "amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")
    assert parse_cpuinfo(GRAVITON2, "aarch64").int8_flags == ("asimddp", "asimd")
    assert parse_cpuinfo("", "x86_64").isa == "unknown"  # no /proc/cpuinfo (e.g. in a sandbox): portable settings


@pytest.mark.parametrize(("text", "machine", "reduce_range"), [
    (EPYC_AVX2, "x86_64", True), (SKYLAKE_AVX512, "x86_64", True), (ICELAKE_VNNI, "x86_64", False),
    (ALDERLAKE_AVX_VNNI, "x86_64", False), (SAPPHIRE_RAPIDS_AMX, "x86_64", False), (GRAVITON3, "aarch64", False),
    (CORTEX_A72, "aarch64", False), (POWER9, "ppc64le", True),
])
def test_auto_settings_keep_7_bit_weights_only_where_u8s8_saturates(text, machine, reduce_range):
    settings = int8_settings("auto", parse_cpuinfo(text, machine))
    assert settings.reduce_range is reduce_range
    assert settings.weight_range == ((-64, 64) if reduce_range else (-127, 127))
    assert (settings.format, settings.per_channel, settings.activations, settings.op_types) == (
        "QDQ", True, "uint8", ("MatMul",))


def test_an_explicit_target_wins_over_the_cpu_and_a_wrong_one_is_refused():
    assert int8_settings("vnni", parse_cpuinfo(EPYC_AVX2, "x86_64")).reduce_range is False
    assert int8_settings("avx2", parse_cpuinfo(ICELAKE_VNNI, "x86_64")).reduce_range is True
    with pytest.raises(ExportError, match=r"unknown INT8 target 'avx'; use one of auto, vnni, avx512, avx2, arm64, "
                                          r"portable"):
        int8_settings("avx")


def _qdq_matmul(weights: np.ndarray) -> bytes:
    """x (uint8, scale 1) @ weights (int8, scale 1): the QDQ pattern onnxruntime fuses into an integer matmul."""
    k, n = weights.shape
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8),
             "xz"), numpy_helper.from_array(weights, "wq"), numpy_helper.from_array(np.ones(n, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


@pytest.mark.parametrize("top", [127, 64])
def test_this_cpu_saturates_full_range_weights_exactly_where_the_settings_say(top):
    """255 x `top` summed over 64 inputs, against the exact integer product; onnxruntime fuses the pattern into its
    u8 x s8 kernel, so on AVX2/AVX-512 without VNNI full-range weights saturate and 7-bit ones do not."""
    weights = np.full((64, 4), top, np.int8)
    session = ort.InferenceSession(_qdq_matmul(weights), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": np.full((1, 64), 255, np.float32)})[0]
    exact = 255 * top * 64
    target = this_cpu().target
    if top == 64 or target in ("vnni", "arm64"):
        np.testing.assert_array_equal(got, exact)
    elif target in ("avx2", "avx512"):
        assert (got < exact).all()  # pairs clamped at 32,767: the accuracy loss reduce_range avoids
    else:
        pytest.skip(f"saturation of full-range weights is unknown on this CPU ({this_cpu().model}, {target})")


def _weights(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{fp32 weight name: (its int8 values, per-channel scales)} of an INT8 QDQ file."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    return {name[: -len("_quantized")]: (values, inits[name[: -len("_quantized")] + "_scale"])
            for name, values in inits.items() if name.endswith("_quantized") and values.dtype == np.int8}


@pytest.mark.parametrize("target", ["avx2", "vnni"])
def test_weights_are_7_bit_for_avx2_and_8_bit_for_vnni(target, tmp_path):
    fp32_path = int8_export().model
    reader = CalibrationReader(open_images(data_dirs()["train"]), load_exportable(dinov2_run()).spec)
    path = quantize_int8(fp32_path, tmp_path / f"{target}.onnx", reader, SETTINGS[target])
    fp32 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32_path)).graph.initializer}
    quantized = _weights(path)
    assert len(quantized) == 12  # q, k, v, out, fc1, fc2 in each of 2 layers (the head is a Gemm: left fp32)
    top = 64 if target == "avx2" else 127
    for name, (values, scale) in quantized.items():
        per_channel = np.abs(values.astype(np.int32)).max(axis=0)  # [in, out] weights: one scale per output
        assert (per_channel == top).all(), name  # symmetric: each channel's largest weight maps to +-top
        np.testing.assert_allclose(scale, np.abs(fp32[name]).max(axis=0) / top, rtol=1e-6)
        np.testing.assert_allclose(values * scale, fp32[name], rtol=0, atol=float(scale.max()) / 2 + 1e-7)


def test_int8_report_records_the_target_the_settings_and_the_cpu():
    result = int8_export()  # target auto: this CPU's
    saved = json.loads((result.out / "int8_report.json").read_text())
    cpu = this_cpu()
    assert saved["settings"] == {**SETTINGS[cpu.target].to_dict(), "requested": "auto", "op_types": ["MatMul"]}
    assert saved["settings"]["reduce_range"] is (cpu.target in ("avx2", "avx512", "portable"))
    assert saved["cpu"] == {"model": cpu.model, "arch": cpu.arch, "isa": cpu.isa, "int8_flags": list(cpu.int8_flags)}
    low, high = SETTINGS[cpu.target].weight_range
    line = (f"INT8 target {cpu.target} (asked: auto): weights in [{low}, {high}]"
            f"{' (reduce_range)' if low == -64 else ''}; measured on {cpu.model} ({cpu.arch}, {cpu.isa})")
    assert line in result.report.lines()


def test_the_report_says_when_it_was_not_measured_on_the_target_cpu():
    report = int8_export().report
    other = "avx2" if this_cpu().target == "vnni" else "vnni"
    report = dataclasses.replace(report, settings={**SETTINGS[other].to_dict(), "requested": other})
    assert report.target_line().endswith("; not the target CPU: its accuracy and speed may differ")
    report = dataclasses.replace(report, settings={**SETTINGS["portable"].to_dict(), "requested": "portable"})
    assert "not the target CPU" not in report.target_line()


def test_an_unknown_target_fails_before_any_work(tmp_path):
    with pytest.raises(ExportError, match="unknown INT8 target 'sse'"):
        export_onnx_dir(dinov2_run(), tmp_path / "out", int8=True, calibration=data_dirs()["train"],
                        int8_target="sse")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["export", "onnx", "--adapter", str(dinov2_run()), "--out", str(tmp_path / "o"),
                                      "--int8", "--calibration", str(data_dirs()["train"]), "--int8-target", "sse"])
    assert isinstance(result.exception, ExportError) and "unknown INT8 target 'sse'" in str(result.exception)
    assert not (tmp_path / "o").exists()
