"""Collections of images with image-level labels (and, where known, ground-truth masks).

Every reader is a ``torch.utils.data.Dataset`` of :class:`Sample` with ``class_names``,
``ids``, ``path(i)`` and ``labels(i)`` (see :mod:`adcam_fast.data.base`);
:func:`open_dataset` opens one from a ``--data SPEC`` string. pycocotools is imported only
when a COCO collection is opened.
"""

from adcam_fast.data.base import IGNORE_INDEX, ImageDataset, Sample, open_dataset
from adcam_fast.data.coco import CocoDataset
from adcam_fast.data.folder import FolderDataset
from adcam_fast.data.images import (
    ImageDecodeError,
    load_image,
    load_mask,
    mask_to_image,
    voc_palette,
)
from adcam_fast.data.synthetic import SyntheticDataset, make_synthetic, render
from adcam_fast.data.voc import VOC_CLASSES, VOCDataset

__all__ = [
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "CocoDataset",
    "FolderDataset",
    "ImageDataset",
    "ImageDecodeError",
    "Sample",
    "SyntheticDataset",
    "VOCDataset",
    "load_image",
    "load_mask",
    "make_synthetic",
    "mask_to_image",
    "open_dataset",
    "render",
    "voc_palette",
]
