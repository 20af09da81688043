"""The tile grid covers every pixel with the asked overlap; tiles are the image's pixels, padded and resized."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vislora import ConfigError
from vislora.data import DataError, collate
from vislora.data.tiling import TilingConfig, image_spec, starts, tile, tile_grid
from vislora.data.transforms import InputSpec, build_transform


@pytest.mark.parametrize(("length", "size", "overlap", "expected"), [
    (10, 4, 0, [0, 4, 6]),  # the last tile shifted to end at the border
    (8, 4, 0, [0, 4]),
    (10, 4, 1, [0, 3, 6]),
    (11, 4, 1, [0, 3, 6, 7]),
    (4, 4, 2, [0]),
    (3, 4, 0, [0]),  # shorter than a tile: one (padded) tile
])
def test_starts_by_hand(length, size, overlap, expected):
    assert starts(length, size, overlap) == expected


@pytest.mark.parametrize(("height", "width", "size", "overlap"), [(70, 50, 32, 8), (64, 64, 32, 0), (33, 97, 16, 5)])
def test_grid_covers_every_pixel_with_the_overlap(height, width, size, overlap):
    covered = torch.zeros(height, width, dtype=torch.int)
    for top, left in tile_grid(height, width, size, overlap):
        assert top + size <= height and left + size <= width  # no tile leaves the image
        covered[top:top + size, left:left + size] += 1
    assert covered.min() >= 1
    for axis in (starts(height, size, overlap), starts(width, size, overlap)):
        shared = [a + size - b for a, b in itertools.pairwise(axis)]  # pixels neighbours share
        assert all(s >= overlap for s in shared) and all(s == overlap for s in shared[:-1])


def test_tiles_are_the_image_pixels():
    image = torch.arange(3 * 10 * 12, dtype=torch.float).reshape(3, 10, 12)
    tiles, positions = tile(image, 6, overlap=2)
    assert positions == [(0, 0), (0, 4), (0, 6), (4, 0), (4, 4), (4, 6)]
    assert tiles.shape == (6, 3, 6, 6)
    for (top, left), piece in zip(positions, tiles, strict=True):
        assert torch.equal(piece, image[:, top:top + 6, left:left + 6])


def test_small_image_is_zero_padded():
    image = torch.ones(3, 5, 7)
    tiles, positions = tile(image, 8)
    assert positions == [(0, 0)]
    assert torch.equal(tiles[0, :, :5, :7], image)
    assert tiles[0, :, 5:].abs().sum() == 0 and tiles[0, :, :, 7:].abs().sum() == 0


def test_tiles_are_resized_to_the_model_input():
    image = torch.randn(3, 64, 64)
    tiles, positions = tile(image, 32, input_size=16)
    assert tiles.shape == (4, 3, 16, 16)
    expected = F.interpolate(image[None, :, 32:, :32], size=(16, 16), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    assert torch.equal(tiles[positions.index((32, 0))], expected)


@pytest.mark.parametrize(("size", "overlap", "named"), [(8, 8, "overlap=8"), (8, 9, "overlap=9"), (0, 0, "size=0"),
                                                         (8, -1, "overlap=-1")])
def test_bad_sizes_are_config_errors(size, overlap, named):
    with pytest.raises(ConfigError, match=named):
        tile(torch.zeros(3, 16, 16), size, overlap)


def test_config_checks_overlap_against_the_tile_side():
    with pytest.raises(ValueError, match="overlap=16 with size=16"):
        TilingConfig(size=16, overlap=16)
    with pytest.raises(ConfigError, match="overlap=32 with size=32"):
        TilingConfig(overlap=32).resolved(32)  # the default side is the model's input side
    assert TilingConfig(overlap=4).resolved(32).size == 32


def test_image_spec_keeps_the_size_or_resizes_whole_images():
    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert image_spec(spec, None) == spec
    assert image_spec(spec, TilingConfig(image_size=96)).size == 96
    kept = image_spec(spec, TilingConfig())
    assert kept.size is None and kept.mean == spec.mean
    pixels = build_transform(kept, train=False)(Image.new("RGB", (50, 70), (128, 64, 255)))
    assert pixels.shape == (3, 70, 50)  # the image's own size, normalised
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([(128 / 255 - 0.5) / 0.25, (64 / 255 - 0.5) / 0.25,
                                                        (1 - 0.5) / 0.25]), atol=1e-6)
    assert build_transform(kept, train=True)(Image.new("RGB", (50, 70))).shape == (3, 70, 50)


def test_images_of_several_sizes_do_not_stack_silently():
    samples = [{"image": torch.zeros(3, 40, 50), "label": 0, "index": 0, "metadata": {}},
               {"image": torch.zeros(3, 60, 50), "label": 1, "index": 1, "metadata": {}}]
    with pytest.raises(DataError, match=r"2 shapes .*data\.tiling\.image_size"):
        collate(samples)
    assert collate(samples[:1])["image"].shape == (1, 3, 40, 50)
