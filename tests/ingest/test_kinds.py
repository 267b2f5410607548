"""Dataset kinds as a registry; the generic Medical Segmentation Decathlon kind on generated
MSD-layout tasks with other label sets; multi-channel / non-CT tasks refused."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_seg.cli import main
from hpc_seg.ingest.kinds import get_kind, kind_names
from hpc_seg.preprocessing.plan import read_plan
from hpc_seg.ingest.prepare import prepare

ROOT = Path(__file__).resolve().parents[2]


def msd_task(root: Path, phantom_dir: Path, labels: dict, modality: dict, n: int = 4, relabel=None) -> Path:
    """An MSD-layout task (dataset.json, imagesTr, labelsTr) from phantom volumes."""
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        shutil.copy(phantom_dir / f"volume-{i}.nii.gz", root / "imagesTr" / f"spleen_{i + 10}.nii.gz")
        seg = nib.load(phantom_dir / f"segmentation-{i}.nii.gz")
        data = np.asarray(seg.dataobj)
        data = relabel(data) if relabel else data
        nib.save(nib.Nifti1Image(data.astype(np.uint8), seg.affine), root / "labelsTr" / f"spleen_{i + 10}.nii.gz")
        training.append({"image": f"./imagesTr/spleen_{i + 10}.nii.gz", "label": f"./labelsTr/spleen_{i + 10}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Spleen", "modality": modality, "labels": labels,
                                                   "training": training, "test": []}))
    return root


def test_registry_lists_kinds():
    assert {"lits", "msd", "kvasir", "phantom"} <= set(kind_names())
    assert get_kind("kvasir").modes == ("2d",) and get_kind("lits").classes == ("background", "liver", "tumour")
    with pytest.raises(Exception, match="unknown dataset kind 'nope'"):
        get_kind("nope")


def test_msd_spleen_task_binary(phantom_dir, tmp_path, capsys):
    task = msd_task(tmp_path / "Task09_Spleen", phantom_dir, {"0": "background", "1": "spleen"}, {"0": "CT"},
                    relabel=lambda d: (d > 0).astype(np.uint8))
    assert main(["prepare", "msd", str(task), str(tmp_path / "spleen.zarr"), "--val", "0.25", "--test", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "classes ['background', 'spleen']" in out
    plan = read_plan(tmp_path / "spleen.zarr", 0)
    assert plan.kind == "msd" and plan.classes == ("background", "spleen") and plan.normalize == "zscore"
    lo, hi = plan.window  # no kind default: the 0.5-99.5 percentile range of the training foreground
    assert lo == pytest.approx(plan.foreground["p0.5"]) and hi == pytest.approx(plan.foreground["p99.5"])
    assert plan.offset[0] == pytest.approx(np.clip(plan.foreground["mean"], lo, hi))


def test_msd_three_label_task_and_bad_layouts(phantom_dir, tmp_path, capsys):
    task = msd_task(tmp_path / "Task07", phantom_dir, {"0": "background", "1": "pancreas", "2": "cancer"},
                    {"0": "CT"}, n=3)
    done = prepare("msd", task, tmp_path / "p.zarr", val=0.0, test=0.34, show_progress=False)
    assert done.plan.classes == ("background", "pancreas", "tumour") and done.report.converted[0] == "spleen_0010"
    brats = msd_task(tmp_path / "Task01", phantom_dir, {"0": "background", "1": "edema"},
                     {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, n=1)
    assert main(["prepare", "msd", str(brats), str(tmp_path / "b.zarr")]) == 2
    err = capsys.readouterr().err
    assert "dataset.json" in err and "multi-channel" in err and not (tmp_path / "b.zarr").exists()
    mri = msd_task(tmp_path / "Task02", phantom_dir, {"0": "background", "1": "left atrium"}, {"0": "MRI"}, n=1)
    assert main(["prepare", "msd", str(mri), str(tmp_path / "m.zarr")]) == 2
    assert "not CT" in capsys.readouterr().err
    (task / "dataset.json").unlink()
    assert main(["convert", "msd", str(task), str(tmp_path / "q.zarr")]) == 2
    assert "dataset.json" in capsys.readouterr().err


def test_no_dataset_name_tests_outside_kinds():
    """Dataset identity lives in hpc_seg/ingest/kinds only: no `dataset == "kvasir"` elsewhere."""
    offenders = []
    for path in (ROOT / "hpc_seg").rglob("*.py"):
        if "kinds" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(v in ("kvasir", "lits", "msd") for v in consts):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_training_never_imports_data_preparation():
    """Statically and at run time: nothing under hpc_seg.training or hpc_seg.distributed imports
    conversion, kinds, the phantom, prepare or the demo."""
    banned = ("hpc_seg.ingest.convert", "hpc_seg.ingest.prepare", "hpc_seg.ingest.kinds", "hpc_seg.ingest.phantom",
              "hpc_seg.demo")
    packages = [ROOT / "hpc_seg" / "training", ROOT / "hpc_seg" / "distributed"]
    for path in (p for pkg in packages for p in pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith(banned) for n in names), (path, names)
    mods = [f"hpc_seg.{pkg.name}.{p.stem}" for pkg in packages for p in pkg.glob("*.py") if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            f"print(sorted(m for m in sys.modules if m.startswith({banned!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
