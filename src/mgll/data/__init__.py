"""Multi-granular medical image-text data: the dataset model, adapters for real formats,
robust image decoding, transforms, a preprocessing cache, patient-level splits and
``mgll data`` (see docs/data.md; the trainer contract is in docs/architecture.md)."""

from mgll.data.adapters import ADAPTERS, adapter_names, detect_adapter, get_adapter
from mgll.data.build import PreparedData, build_datasets, load_pool, load_records, prepare_data
from mgll.data.cache import PreprocessCache, load_resized, resize_square
from mgll.data.config import DataConfig, SplitConfig
from mgll.data.dataset import MultiGranularDataset, collate_samples
from mgll.data.images import ImageLoadError, detect_format, load_image
from mgll.data.records import LevelInfo, Record, RecordSet
from mgll.data.spec import SpecError, records_from_spec
from mgll.data.splits import patient_split, read_split_file, write_split_file
from mgll.data.transforms import CLIP_MEAN, CLIP_STD, build_transform

__all__ = [
    "ADAPTERS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DataConfig",
    "ImageLoadError",
    "LevelInfo",
    "MultiGranularDataset",
    "PreparedData",
    "PreprocessCache",
    "Record",
    "RecordSet",
    "SpecError",
    "SplitConfig",
    "adapter_names",
    "build_datasets",
    "build_transform",
    "collate_samples",
    "detect_adapter",
    "detect_format",
    "get_adapter",
    "load_image",
    "load_pool",
    "load_records",
    "load_resized",
    "patient_split",
    "prepare_data",
    "read_split_file",
    "records_from_spec",
    "resize_square",
    "write_split_file",
]
