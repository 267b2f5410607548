"""Exception types shared across hpc-seg.

Every user-facing error names the file (or config key) it is about, so that the CLI can print
one clear line and exit non-zero.
"""

from __future__ import annotations


class HpcSegError(Exception):
    """Base class for errors that the CLI reports as one line and exit code 2."""


class ConfigError(HpcSegError):
    """Invalid configuration: unknown key, wrong type, bad value."""


class InputDataError(HpcSegError):
    """A source file (NIfTI, JPEG) is unreadable or inconsistent."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class StoreError(HpcSegError):
    """A Zarr store is missing, foreign or incomplete."""


class SplitError(HpcSegError):
    """A train/val/test split file is invalid (e.g. a case in two splits)."""


class PlanError(HpcSegError):
    """A preprocessing plan is missing, of another version, or does not fit the data it is used on."""
