"""Multi-granular medical image-text data: the dataset model, adapters for real formats,
robust image decoding, transforms, a preprocessing cache, patient-level splits and
``mgll data`` (see docs/data.md; the trainer contract is in docs/architecture.md).

The names below load when first asked for (``from mgll.data import X`` loads ``X``'s module),
so the command layer (``mgll data --help``) and ``from mgll.data.X import Y`` load no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mgll.lazy import lazy_names

if TYPE_CHECKING:
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

_HOMES = {
    "ADAPTERS": "mgll.data.adapters",
    "adapter_names": "mgll.data.adapters",
    "detect_adapter": "mgll.data.adapters",
    "get_adapter": "mgll.data.adapters",
    "PreparedData": "mgll.data.build",
    "build_datasets": "mgll.data.build",
    "load_pool": "mgll.data.build",
    "load_records": "mgll.data.build",
    "prepare_data": "mgll.data.build",
    "PreprocessCache": "mgll.data.cache",
    "load_resized": "mgll.data.cache",
    "resize_square": "mgll.data.cache",
    "DataConfig": "mgll.data.config",
    "SplitConfig": "mgll.data.config",
    "MultiGranularDataset": "mgll.data.dataset",
    "collate_samples": "mgll.data.dataset",
    "ImageLoadError": "mgll.data.images",
    "detect_format": "mgll.data.images",
    "load_image": "mgll.data.images",
    "LevelInfo": "mgll.data.records",
    "Record": "mgll.data.records",
    "RecordSet": "mgll.data.records",
    "SpecError": "mgll.data.spec",
    "records_from_spec": "mgll.data.spec",
    "patient_split": "mgll.data.splits",
    "read_split_file": "mgll.data.splits",
    "write_split_file": "mgll.data.splits",
    "CLIP_MEAN": "mgll.data.transforms",
    "CLIP_STD": "mgll.data.transforms",
    "build_transform": "mgll.data.transforms",
}


__getattr__ = lazy_names(__name__, _HOMES)
