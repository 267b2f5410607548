"""The preprocessing plan (what turns voxels into model input): the record, computing and applying it, labels, augmentation."""
