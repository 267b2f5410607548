"""Raw sources into a store: dataset kinds, NIfTI/DICOM readers, conversion, the index, splits,
``prepare``, phantoms; and the :class:`~hpc_seg.ingest.catalog.Store` later stages open once."""
