from collections import Counter

import numpy as np
import pytest
from PIL import Image

from synthetic_images import class_image, corrupt_png, image_folder
from vislora.data.transforms import InputSpec, build_transform
from vislora.export import ExportError
from vislora.export.calibration import CalibrationReader, check_resolutions, open_images

SPEC = InputSpec(size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def flat_folder(root, sizes):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        class_image(i % 3, rng, size).save(root / f"{i}.png")
    return root


def test_a_flat_folder_of_images_is_a_calibration_set(tmp_path):
    dataset = open_images(flat_folder(tmp_path / "flat", [32] * 5))
    assert len(dataset) == 5 and dataset.labels() == [-1] * 5
    assert len(open_images(tmp_path / "flat", limit=3)) == 3


def test_calibration_batches_are_the_training_evaluation_transform(tmp_path):
    folder = image_folder(tmp_path / "data", per_class=3, size=40)
    reader = CalibrationReader(open_images(folder), SPEC, batch_size=4)
    batches = []
    while (feed := reader.get_next()) is not None:
        batches.append(feed["input"])
    assert [b.shape for b in batches] == [(4, 3, 24, 24), (4, 3, 24, 24), (1, 3, 24, 24)]
    transform = build_transform(SPEC, train=False)
    first = sorted(folder.rglob("*.png"))[0]
    with Image.open(first) as image:
        expected = transform(image.convert("RGB")).numpy()
    np.testing.assert_array_equal(batches[0][0], expected)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], batches[0])


def test_resolutions_must_match_the_training_images(tmp_path):
    dataset = open_images(flat_folder(tmp_path / "mixed", [32, 32, 48]))
    assert check_resolutions(dataset, None) == Counter({(32, 32): 2, (48, 48): 1})
    assert check_resolutions(dataset, Counter({(32, 32): 9, (48, 48): 1}))
    with pytest.raises(ExportError, match=r"\(32x32\): 48x48: 1"):
        check_resolutions(dataset, Counter({(32, 32): 10}))
    # a training set of mixed sizes: anything inside its range passes, outside fails
    assert check_resolutions(dataset, Counter({(30, 30): 1, (50, 50): 1}))
    with pytest.raises(ExportError, match=r"\(30-40 x 30-40\): 48x48: 1"):
        check_resolutions(dataset, Counter({(30, 30): 1, (40, 40): 1}))


def test_unreadable_or_missing_calibration_data_is_an_error(tmp_path):
    folder = tmp_path / "broken"
    corrupt_png(folder / "a.png")
    with pytest.raises(ExportError, match="none of its 1 images can be read"):
        check_resolutions(open_images(folder), None)
    with pytest.raises(ExportError, match=r"cannot be opened.*does not exist"):
        open_images(tmp_path / "nowhere")


def test_reader_feeds_onnxruntime_quantization(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader

    reader = CalibrationReader(open_images(flat_folder(tmp_path / "f", [32] * 5)), SPEC, batch_size=2)
    assert isinstance(reader, CalibrationDataReader) and len(reader) == 3 and reader.images == 5
    everything = np.concatenate([reader.get_next()["input"] for _ in range(3)])
    assert reader.get_next() is None
    reader.set_range(1, 3)  # quantize_static's CalibStridedMinMax walks the batches in ranges
    np.testing.assert_array_equal(reader.get_next()["input"], everything[2:4])
    np.testing.assert_array_equal(reader.get_next()["input"], everything[4:])
    assert reader.get_next() is None
