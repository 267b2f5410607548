"""Raw sources into a store: dataset kinds, NIfTI/DICOM readers, conversion, the index, splits, prepare, phantoms."""
