"""One preparation per store at a time: the O_EXCL lock beside the store."""

import json
from pathlib import Path
import os
import subprocess
import sys

import pytest

from hpc_seg.storage import lock
from hpc_seg.ingest.convert import convert
from hpc_seg.ingest.prepare import prepare
from hpc_seg.errors import StoreError


def test_second_preparation_is_refused_naming_the_holder(phantom_dir, tmp_path):
    store = tmp_path / "s.zarr"
    token = lock.acquire(store, "hpc-seg prepare --slurm (4 tasks)", shared=True)
    with pytest.raises(StoreError, match=r"another preparation holds .*prepare --slurm \(4 tasks\).*remove .*s\.zarr\.lock"):
        prepare("lits", phantom_dir, store, show_progress=False)
    assert not store.exists()  # nothing written
    # the jobs of that preparation write under it
    assert convert("lits", phantom_dir, store, show_progress=False, lock_token=token, part=(0, 2), index=False).ok
    with pytest.raises(StoreError, match="not this preparation's"):
        convert("lits", phantom_dir, store, show_progress=False, lock_token="someone-else")
    lock.release(store, token)
    assert not Path(lock.lock_path(store)).exists()
    done = prepare("lits", phantom_dir, store, show_progress=False)  # free again; part 0 kept
    assert done.report.ok and len(done.report.skipped) == 3 and len(done.report.converted) == 3
    assert not Path(lock.lock_path(store)).exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(phantom_dir, tmp_path):
    store = tmp_path / "s.zarr"
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"token": "old", "host": os.uname().nodename, "pid": int(p.stdout), "what": "crashed", "shared": False}
    Path(lock.lock_path(store)).write_text(json.dumps(stale))
    assert prepare("lits", phantom_dir, store, show_progress=False).report.ok
