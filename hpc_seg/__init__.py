"""hpc-seg: distributed training toolkit for liver tumour segmentation from CT."""

__version__ = "0.4.0"
