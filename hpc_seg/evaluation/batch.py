"""``hpc-seg predict MODEL IN_DIR --out OUT_DIR`` — every CT of a folder, one model load.

* Cases: each NIfTI file (``<case>.nii.gz`` / ``.nii``) and each sub-folder (a DICOM series folder,
  or a case folder holding one series deeper) of ``IN_DIR``; case id = file name without suffix or
  folder name. Other files are listed as ignored.
* Outputs: ``OUT_DIR/<case>.nii.gz``, or ``<case>.dcm`` for DICOM inputs with ``--format dicom-seg``
  (a NIfTI input has no instances a DICOM-SEG could reference: it is written as NIfTI, and the
  report says so), each with its JSON (``<case>.nii.gz.json``: volumes and what made them).
  ``OUT_DIR`` is never ``IN_DIR`` and, inside it, is not a case.
* A case whose output and JSON exist, made by the same model file, plan and settings, is skipped;
  one made otherwise, or an output without its JSON, is reported (``--overwrite`` redoes both). A
  bad case is reported with its one-line error and the rest go on (exit 1 at the end);
  ``OUT_DIR/volumes.csv`` lists every case of the folder, also when the run stops.
* The next case is read in a thread while the current one is predicted, the same on every device
  (on a GPU the read hides behind the model; on the CPU it overlaps the model's non-threaded parts).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hpc_seg.errors import HpcSegError
from hpc_seg.evaluation.predict import Predictor, case_name, read_input, sidecar
from hpc_seg.storage.atomic import atomic_write_bytes

COLUMNS = ("case", "liver_ml", "tumour_ml", "tumour_burden", "lesions", "output", "error")


@dataclass
class FolderReport:
    out_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # outputs already there
    failed: dict[str, str] = field(default_factory=dict)  # case → one-line error
    notes: dict[str, str] = field(default_factory=dict)  # case → what the reader left out, format fallbacks
    ignored: list[str] = field(default_factory=list)  # files of IN_DIR that are not cases
    outputs: dict[str, Path] = field(default_factory=dict)  # case → its labels' path, in IN_DIR's order


def discover(in_dir: Path, out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """{case id: input path} of a folder of cases, and the names that are not cases (``out_dir``
    inside ``in_dir`` is skipped)."""
    cases: dict[str, Path] = {}
    ignored = []
    for p in sorted(in_dir.iterdir()):
        if p.name.startswith(".") or p.resolve() == out_dir:
            continue
        if p.is_dir() or p.name.lower().endswith((".nii", ".nii.gz")):
            name = case_name(p)
            if name in cases:
                raise HpcSegError(f"{in_dir}: two inputs for case {name!r} ({cases[name].name}, {p.name}); "
                                  "rename one")
            cases[name] = p
        else:
            ignored.append(p.name)
    if not cases:
        raise HpcSegError(f"{in_dir}: no NIfTI files or DICOM folders to segment")
    return cases, ignored


def output_of(out_dir: Path, name: str, path: Path, fmt: str) -> tuple[Path, str]:
    """Where a case's labels go, and in which format (DICOM-SEG only for DICOM inputs)."""
    if fmt == "dicom-seg" and path.is_dir():
        return out_dir / f"{name}.dcm", "dicom-seg"
    return out_dir / f"{name}.nii.gz", "nifti"


def _done(out: Path, fingerprint: dict) -> str | None:
    """'done' when ``out`` and its JSON exist and the same model, plan and settings made them; None
    when there is nothing yet; else why the case cannot be skipped nor silently redone."""
    side = sidecar(out)
    if not out.exists() and not side.exists():
        return None
    try:
        made = json.loads(side.read_text())
    except (OSError, ValueError):
        return f"{out.name} exists without a readable {side.name}; --overwrite replaces it"
    if not out.exists():
        return None
    changed = [k for k, v in fingerprint.items() if k != "model" and made.get(k) != v]
    if changed:
        return (f"{out.name} was made with other {', '.join(changed)} ({', '.join(f'{k}={made.get(k)}' for k in changed)}"
                "); --overwrite redoes it with this model")
    return "done"


def predict_folder(source, in_dir, out_dir, fmt: str | None = None, overwrite: bool = False,
                   tta: bool | None = None, postprocess: bool | None = None, cpu: bool = False,
                   progress: bool = True) -> FolderReport:
    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    if out_dir == in_dir:
        raise HpcSegError(f"--out {out_dir}: is the input folder; write the predictions to another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise HpcSegError(f"{out_dir}: exists and is not a folder (a folder input writes a folder of outputs)")
    if out_dir.name.lower().endswith((".nii", ".nii.gz", ".dcm")):
        raise HpcSegError(f"--out {out_dir}: a folder of cases writes a folder; give a folder name")
    cases, ignored = discover(in_dir, out_dir)
    predictor = Predictor(source, tta, postprocess, cpu)
    report = FolderReport(out_dir, ignored=ignored)
    todo = []
    for name, path in cases.items():
        out, case_fmt = output_of(out_dir, name, path, fmt or "nifti")
        report.outputs[name] = out
        if fmt == "dicom-seg" and case_fmt == "nifti":
            report.notes[name] = "NIfTI input: written as NIfTI (a DICOM-SEG needs a DICOM series)"
        state = None if overwrite else _done(out, predictor.fingerprint)
        if state == "done":
            report.skipped.append(name)
        elif state is not None:
            report.failed[name] = state
        else:
            todo.append((name, path, out, case_fmt))
    try:
        if todo:
            _run(predictor, todo, report, progress)
    finally:  # also when the run stops (a signal, a GPU error): the table of what is done
        write_volumes(report)
    return report


def _run(predictor: Predictor, todo: list, report: FolderReport, progress: bool) -> None:
    """Predict ``todo`` in order, reading case i + 1 while case i is predicted. Off a terminal (a SLURM
    log) one line per case replaces the bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.description}"), disable=not progress, transient=False)
    with ThreadPoolExecutor(max_workers=1) as pool, bar:
        task = bar.add_task("", total=len(todo))
        pending = pool.submit(read_input, todo[0][1])
        for i, (name, _, out, fmt) in enumerate(todo):
            reading, pending = pending, (pool.submit(read_input, todo[i + 1][1]) if i + 1 < len(todo) else None)
            bar.update(task, description=name)
            t0 = time.perf_counter()
            _one(predictor, reading, name, out, fmt, report)
            del reading  # the case's arrays go before the next one arrives
            bar.advance(task)
            if not progress:
                status = "failed" if name in report.failed else "done"
                print(f"[{i + 1}/{len(todo)}] {name}: {status} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                      flush=True)


def _one(predictor: Predictor, reading, name: str, out: Path, fmt: str, report: FolderReport) -> None:
    """One case; any error is that case's (an unreadable file, a series highdicom refuses, a GPU out
    of memory), reported as its type and message, and the folder goes on."""
    try:
        case = reading.result()
        labels, _ = predictor.labels(case)
        info = predictor.write(case, labels, out, fmt)
    except HpcSegError as exc:
        report.failed[name] = " ".join(str(exc).split())
        return
    except Exception as exc:  # noqa: BLE001 - one case's failure must not end 70 others
        report.failed[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        import torch

        torch.cuda.empty_cache()  # after an out-of-memory case the next starts clean (no-op without CUDA)
        return
    report.done.append(name)
    if info["left_out"]:
        report.notes[name] = "; ".join(["left out " + x for x in info["left_out"]]
                                       + ([report.notes[name]] if name in report.notes else []))


def write_volumes(report: FolderReport) -> Path:
    """``volumes.csv``: one row per case of the folder (figures from each case's JSON; failures with
    their error), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for name, out in report.outputs.items():
        row = {"case": name, "error": report.failed.get(name, "")}
        if name not in report.failed:
            try:
                info = json.loads(sidecar(out).read_text())
            except (OSError, ValueError):
                info = {}
                row["error"] = f"no readable {sidecar(out).name}"
            row.update({k: info.get(k) for k in COLUMNS[1:5]}, output=out.name)
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return atomic_write_bytes(report.out_dir / "volumes.csv", buf.getvalue().encode())
