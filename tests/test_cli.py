"""The console script end to end: demo on the phantom, inspect, config printing."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    exe = Path(sys.executable).parent / "hpc-seg"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


def test_demo_end_to_end(tmp_path):
    store = tmp_path / "demo" / "phantom.zarr"
    r = run("demo", "--set", f"data.store={store}", "--set", "data.size=[64,64]")
    assert r.returncode == 0, r.stderr
    assert "samples streamed" in r.stdout and (store / "meta" / "index" / "zarr.json").is_file()
    final = store.parent / "runs" / "demo" / "final.json"  # the main job ran (submitit local executor)
    assert final.is_file() and "validation mean IoU" in r.stdout
    assert (store / "meta" / "splits" / "seed0" / "zarr.json").is_file()
    assert (store.parent / "runs" / "demo" / "plan.json").is_file()
    import re

    done = next(line for line in r.stdout.splitlines() if line.startswith("done:"))
    assert not re.search(r"\d\.\d{4,}", done), done  # figures for people are rounded and labelled
    assert "best mean IoU" in done
    r = run("inspect", str(store))
    assert r.returncode == 0 and "lits_0007" in r.stdout


def test_config_print_and_bad_config(tmp_path):
    r = run("config", "--config", "demo", "--set", "data.size=[96,96]")
    assert r.returncode == 0 and "- 96" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  bogus: 1\n")
    r = run("config", "--config", str(bad))
    assert r.returncode == 2 and "data.bogus" in r.stderr and "bad.yaml" in r.stderr


def test_inspect_not_a_store(tmp_path):
    r = run("inspect", str(tmp_path))
    assert r.returncode == 2 and "not a Zarr store" in r.stderr
