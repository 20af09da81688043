"""load_image: 8-bit files as before, 16-bit without clipping, DICOM windowing against numpy hand computations on
pydicom's own bundled test files, and clear errors on bad input."""

import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.pixels import apply_windowing

from synthetic_images import class_image, csv_manifest, tiny_train_config
from vislora.data import InputSpec, build_transform, check_dataset, collate, image_header, load_image, manifest
from vislora.data.transforms import AugmentConfig
from vislora.errors import ConfigError, DataError, TooLarge
from vislora.evaluate.classifier import open_eval_data
from vislora.export import merge_adapter
from vislora.run_config import DataSection, TrainConfig
from vislora.runs import input_spec, load_trained, read_task
from vislora.serve import ServeConfig, build_engine
from vislora.train.trainer import Trainer

FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled with pydicom: never downloaded
CT, MR = FILES / "CT_small.dcm", FILES / "MR_small.dcm"


def hand_values(path: Path) -> np.ndarray:
    """Stored values x RescaleSlope + RescaleIntercept, in float64."""
    ds = pydicom.dcmread(path)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return ds.pixel_array.astype(np.float64) * slope + intercept


def hand_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 written out: 0 below, 1 above, linear in between (width 1: a step)."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        middle = ((x - (center - 0.5)) / (width - 1) + 0.5)
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, middle))


def as_gray(image: torch.Tensor) -> np.ndarray:
    assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    return image[0].numpy()


def png_bytes(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 48-bit RGB)."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ 8 and 16 bit
@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"),
                                           ("RGB", "JPEG"), ("L", "TIFF")])
def test_8bit_files_give_the_same_pil_image_as_before(tmp_path, mode, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    class_image(1, np.random.default_rng(0), size=24).convert(mode).save(path, format=fmt)
    with Image.open(path) as image:
        image.load()
        before = image.convert("RGB")
    for source in (path, str(path), path.read_bytes()):
        got = load_image(source)
        assert isinstance(got, Image.Image) and got.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(before))
    assert image_header(path).bits == 8 and image_header(path).modality == "photo"


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_reads_back_exactly_as_value_over_65535(tmp_path, fmt):
    values = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
    values[0, :3] = (65535, 256, 0)
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(values).save(path, format=fmt)
    got = load_image(path)
    assert tuple(got.shape) == (3, 20, 30)
    assert np.array_equal(as_gray(got), values.astype(np.float32) / np.float32(65535))
    assert image_header(path).bits == 16 and image_header(path).size == (30, 20)


@pytest.mark.parametrize(("channels", "color_type"), [(3, 2), (4, 6), (2, 4)])
def test_16bit_colour_png_is_refused_rather_than_cut_to_8_bits(channels, color_type):
    pixels = np.random.default_rng(0).integers(0, 65536, (4, 5, channels))
    with pytest.raises(DataError, match=r"16 bits per sample .* cut to 8 bits; save it as 16-bit grayscale"):
        load_image(png_bytes(pixels, color_type))


# ------------------------------------------------------------------------------------------------ DICOM window
def test_ct_without_a_window_falls_back_to_min_max():
    x = hand_values(CT)
    expected = (x - x.min()) / (x.max() - x.min())
    assert image_header(CT).window is None and image_header(CT).modality == "CT"
    for window in ("auto", "none"):
        assert np.allclose(as_gray(load_image(CT, window=window)), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("window", "center", "width"), [("lung", -600, 1500), ("soft_tissue", 40, 400),
                                                         ("bone", 400, 1800), ("brain", 40, 80),
                                                         ((100.0, 301.0), 100, 301), ((100, 1), 100, 1)])
def test_ct_presets_and_explicit_windows_equal_the_hand_computation(window, center, width):
    expected = hand_linear(hand_values(CT), center, width)
    assert np.allclose(as_gray(load_image(CT, window=window)), expected, atol=1e-6, rtol=0)


def test_mr_uses_its_own_window_and_agrees_with_pydicom():
    ds = pydicom.dcmread(MR)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0) == image_header(MR).window
    got = as_gray(load_image(MR))
    assert np.allclose(got, hand_linear(hand_values(MR), 600, 1600), atol=1e-6, rtol=0)
    assert 0 < (got == 1).sum() < got.size  # bright pixels are clipped by the file's window
    reference = apply_windowing(ds.pixel_array.astype(np.float64), ds)  # signed 16-bit output range
    assert np.allclose(got, (reference + 32768) / 65535, atol=1e-6, rtol=0)


def test_rescaled_ct_with_its_own_window_through_jpeg2000():
    path = FILES / "693_J2KI.dcm"  # JPEG 2000 decoded by Pillow; RescaleIntercept -1024; window 40/100
    assert image_header(path).window == (40.0, 100.0)
    assert np.allclose(as_gray(load_image(path)), hand_linear(hand_values(path), 40, 100), atol=1e-6, rtol=0)


def test_multi_valued_window_uses_the_first_pair():
    path = FILES / "examples_overlay.dcm"  # WindowCenter [450, 200], WindowWidth [790, 443]
    assert image_header(path).window == (450.0, 790.0)
    assert np.allclose(as_gray(load_image(path)), hand_linear(hand_values(path), 450, 790), atol=1e-6, rtol=0)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_the_files_voi_lut_function_is_followed(tmp_path, function):
    ds = pydicom.dcmread(MR)
    ds.VOILUTFunction = function
    ds.save_as(tmp_path / "mr.dcm")
    x = hand_values(MR)
    expected = (np.clip((x - 600) / 1600 + 0.5, 0, 1) if function == "LINEAR_EXACT"
                else 1 / (1 + np.exp(-4 * (x - 600) / 1600)))
    assert np.allclose(as_gray(load_image(tmp_path / "mr.dcm")), expected, atol=1e-6, rtol=0)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    expected = 1 - hand_linear(hand_values(MR), 600, 1600)
    assert np.allclose(as_gray(load_image(tmp_path / "mono1.dcm")), expected, atol=1e-6, rtol=0)


def test_rgb_ybr_and_palette_dicom_become_rgb():
    ds = pydicom.dcmread(FILES / "SC_rgb_rle.dcm")  # RLE, 8-bit RGB
    rgb = load_image(FILES / "SC_rgb_rle.dcm")
    assert torch.allclose(rgb, torch.from_numpy(ds.pixel_array / 255.0).permute(2, 0, 1).float(), atol=1e-7)

    path = FILES / "SC_ybr_full_422_uncompressed.dcm"  # YBR_FULL_422: converted with the JPEG/JFIF equations
    ybr = pydicom.pixels.pixel_array(pydicom.dcmread(path), as_rgb=False).astype(np.float64)
    y, cb, cr = ybr[..., 0], ybr[..., 1] - 128, ybr[..., 2] - 128
    hand = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb]).clip(0, 255) / 255
    assert np.abs(load_image(path).numpy() - hand).max() <= 1.01 / 255  # pydicom rounds to uint8

    ds = pydicom.dcmread(FILES / "examples_palette.dcm")  # 16-bit lookup tables, first mapped value 0
    index = ds.pixel_array
    tables = [np.frombuffer(getattr(ds, f"{c}PaletteColorLookupTableData"), "<u2") for c in ("Red", "Green", "Blue")]
    hand = np.stack([table[index] for table in tables]) / 65535
    assert np.allclose(load_image(FILES / "examples_palette.dcm").numpy(), hand, atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------------ errors
def test_dicom_without_pixel_data_names_the_file_and_its_kind():
    with pytest.raises(DataError, match=r"rtplan\.dcm is a DICOM RT Plan Storage \(RTPLAN\) object that holds no "
                                        "PixelData"):
        load_image(FILES / "rtplan.dcm")
    with pytest.raises(DataError, match="holds no PixelData"):
        image_header(FILES / "rtplan.dcm")


def test_missing_decoder_names_the_transfer_syntax_and_what_to_install():
    with pytest.raises(DataError, match=r"compressed as JPEG-LS Lossless .* no decoder for it is installed; install "
                                        r"one: .*pip install pylibjpeg pylibjpeg-libjpeg"):
        load_image(FILES / "MR_small_jpeg_ls_lossless.dcm")
    # Pillow is installed and tried, but cannot read 12-bit JPEG
    with pytest.raises(DataError, match=r"cannot read its JPEG Extended \(Process 2 and 4\).*12-bit.*install another "
                                        r"decoder: .*python-gdcm"):
        load_image(FILES / "JPEG-lossy.dcm")


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    with pytest.raises(TooLarge, match=r"CT_small\.dcm is 128x128 = 16,384 pixels, above the limit of 16,383"):
        load_image(CT, max_pixels=128 * 128 - 1)
    assert load_image(CT, max_pixels=128 * 128).shape == (3, 128, 128)
    # a file no installed decoder reads: refused from its header, before decoding
    with pytest.raises(TooLarge, match="256x1024 = 262,144 pixels"):
        load_image(FILES / "JPEG-lossy.dcm", max_pixels=1000)
    cut = png_bytes(np.zeros((40, 40)), 0)[:60]  # a 40x40 header, truncated pixel data
    with pytest.raises(TooLarge, match=r"the image is 40x40 = 1,600 pixels, above the limit of 100 pixels"):
        load_image(cut, max_pixels=100)


def test_not_an_image_multi_frame_bad_window_and_no_pydicom(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="the image is not in an image format vislora reads; give PNG"):
        load_image(b"hello, not an image")
    (tmp_path / "scan.dcm").write_text("not dicom")
    with pytest.raises(DataError, match="no 'DICM' marker at byte 128: not a DICOM Part 10 file"):
        load_image(tmp_path / "scan.dcm")
    with pytest.raises(DataError, match=r"multi-frame DICOM file \(15 frames\); vislora reads one image per file"):
        load_image(FILES / "rtdose.dcm")
    with pytest.raises(ConfigError, match=r"unknown DICOM window 'lungs'.*lung, soft_tissue, bone, brain"):
        load_image(CT, window="lungs")
    with pytest.raises(ConfigError, match="width 0 is below 1"):
        load_image(CT, window=(40, 0))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(DataError, match=r"reading DICOM needs pydicom: pip install 'vislora\[medical\]'"):
        load_image(MR)


# ------------------------------------------------------------------------------------------------ pipeline
def test_timm_transforms_take_the_float_tensors(tmp_path):
    values = np.random.default_rng(1).integers(0, 65536, (32, 32)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png")
    spec = InputSpec(32)
    pixels = build_transform(spec, train=False)(image)  # Resize to the same size, MaybeToTensor passes it on
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (spec.mean, spec.std))
    assert torch.allclose(pixels, (torch.from_numpy(values / 65535.0).float() - mean) / std, atol=1e-5)
    train = build_transform(InputSpec(16), train=True)(load_image(CT))  # crop, flip, colour jitter
    assert train.shape == (3, 16, 16) and torch.isfinite(train).all()
    with pytest.warns(UserWarning, match="strong augmentation"):
        augment = AugmentConfig(auto_augment="rand-m9-mstd0.5")
    with pytest.raises(DataError, match="auto_augment works on 8-bit images only"):
        build_transform(InputSpec(16), train=True, augment=augment)(load_image(CT))


def test_a_manifest_of_dicom_and_png_rows_gives_a_batch(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(FILES / name, tmp_path / name)
    class_image(0, np.random.default_rng(0)).save(tmp_path / "photo.png")
    rows = [{"path": "CT_small.dcm", "label": "ct"}, {"path": "MR_small.dcm", "label": "mr"},
            {"path": "photo.png", "label": "ct"}]
    dataset = manifest(csv_manifest(tmp_path, rows))
    dataset.window = "lung"
    assert torch.equal(dataset.open_image(0), load_image(tmp_path / "CT_small.dcm", window="lung"))
    assert dataset.subset(2, seed=0).window == "lung"
    transform = build_transform(InputSpec(24), train=False)
    dataset.transform = lambda image, index: transform(image)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["image"].shape == (3, 3, 24, 24) and batch["label"].tolist() == [0, 1, 0]
    assert sorted(dataset.resolutions().items()) == [((32, 32), 1), ((64, 64), 1), ((128, 128), 1)]


def test_data_check_reports_bit_depth_modality_and_window_coverage(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        shutil.copy(FILES / name, tmp_path / name)
    class_image(0, np.random.default_rng(0)).save(tmp_path / "photo.png")
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(tmp_path / "deep.png")
    rows = [{"path": p, "label": "a"} for p in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "photo.png", "deep.png")]
    report = check_dataset(manifest(csv_manifest(tmp_path, rows)), tmp_path / "audit", fraction=1.0)
    assert [(Path(f).name, "holds no PixelData" in why) for f, why in report.corrupt] == [("rtplan.dcm", True)]
    assert report.bit_depths == {"8": 1, "16": 3}
    assert report.modalities == {"photo": 2, "CT": 1, "MR": 1}
    assert report.dicom_windows == {"file": 1, "fallback": 1}
    text = str(report)
    assert "bit depth: 8-bit x1, 16-bit x3" in text and "modality: photo x2, CT x1, MR x1" in text
    assert "DICOM windowing: 1 of 2 grayscale files carry WindowCenter/WindowWidth, 1 fall back" in text
    assert Image.open(report.contact_sheet).size == (4 * 104, 118)  # tensors previewed in 8 bits


def test_the_window_is_configured_and_travels_in_the_input_spec():
    assert DataSection(train="x").window == "auto"
    assert DataSection(train="x", window=[40, 400]).window == (40.0, 400.0)
    with pytest.raises(ValueError, match="unknown DICOM window 'lungs'"):
        DataSection(train="x", window="lungs")
    old = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}  # a task.json before windows
    assert input_spec({"input": old}).window == "auto"
    assert input_spec({"input": {**old, "window": [40, 400]}}) == InputSpec(32, (0.5,) * 3, (0.5,) * 3,
                                                                             window=(40.0, 400.0))


def test_a_run_trained_with_a_window_is_evaluated_and_served_with_it(tmp_path):
    rows = []
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm"] * 2):
        shutil.copy(FILES / name, tmp_path / f"{i}.dcm")
        rows.append({"path": f"{i}.dcm", "label": name[:2].lower()})
    data = csv_manifest(tmp_path, rows)
    config = tiny_train_config(tmp_path / "run", data, optim={"max_steps": 1},
                               data={"window": "lung", "allow_mixed_resolution": True})
    torch.manual_seed(0)
    adapter = Trainer(TrainConfig.parse(config)).fit().adapter_dir
    assert read_task(adapter)["input"]["window"] == "lung"
    _, task = load_trained(adapter)
    assert task["input_spec"].window == "lung" and open_eval_data(task, data).window == "lung"
    torch.manual_seed(0)  # the random-init base of the run
    engine = build_engine(ServeConfig.parse({"adapters": {"a": str(adapter)}}))
    transform = build_transform(task["input_spec"], train=False)
    served = engine.preprocess(CT.read_bytes())
    assert torch.equal(served, transform(load_image(CT, window="lung")))
    assert not torch.allclose(served, transform(load_image(CT)), atol=0.1)
    merged = merge_adapter(adapter, tmp_path / "merged").out  # deployments outside vislora learn the window too
    assert json.loads((merged / "vislora_merge.json").read_text())["input"]["dicom_window"] == "lung"
