"""Datasets, model-driven transforms and the dataset audit."""

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
    "ArrayDataset",
    "AttributeSet",
    "AugmentConfig",
    "DataError",
    "DataReport",
    "ImageDataset",
    "InputSpec",
    "MultiLabelFormat",
    "Record",
    "SampleTransform",
    "build_mixup",
    "build_transform",
    "check_dataset",
    "collate",
    "fashion_mnist",
    "image_folder",
    "manifest",
    "model_input_spec",
    "open_dataset",
    "rare_attributes",
]
