"""Datasets, the image reader (8-bit, 16-bit, DICOM), model-driven transforms, tiling of large images, generative
(captioning / VQA) data and the dataset audit."""

from vislora.data.attributes import AttributeSet, rare_attributes
from vislora.data.check import DataReport, check_dataset
from vislora.data.datasets import (
    ArrayDataset,
    ImageDataset,
    MultiLabelFormat,
    Record,
    collate,
    fashion_mnist,
    image_folder,
    manifest,
    open_dataset,
)
from vislora.data.generative import (
    GenerativeDataset,
    GenerativeExample,
    collate_generative,
    read_generative,
)
from vislora.data.images import WINDOW_PRESETS, ImageHeader, image_header, load_image
from vislora.data.tiling import TilingConfig, tile, tile_grid
from vislora.data.transforms import (
    AugmentConfig,
    InputSpec,
    SampleTransform,
    build_mixup,
    build_transform,
    model_input_spec,
)
from vislora.errors import DataError

__all__ = [
    "WINDOW_PRESETS",
    "ArrayDataset",
    "AttributeSet",
    "AugmentConfig",
    "DataError",
    "DataReport",
    "GenerativeDataset",
    "GenerativeExample",
    "ImageDataset",
    "ImageHeader",
    "InputSpec",
    "MultiLabelFormat",
    "Record",
    "SampleTransform",
    "TilingConfig",
    "build_mixup",
    "build_transform",
    "check_dataset",
    "collate",
    "collate_generative",
    "fashion_mnist",
    "image_folder",
    "image_header",
    "load_image",
    "manifest",
    "model_input_spec",
    "open_dataset",
    "rare_attributes",
    "read_generative",
    "tile",
    "tile_grid",
]
