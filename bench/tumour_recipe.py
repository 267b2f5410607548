"""The liver-tumour cascade recipe on CT it never saw: train ``configs/liver_tumour_cpu.yaml`` without
the held-out CTs, then score the cascade (and its stage 1 alone, beside) on them.

    python bench/tumour_recipe.py --heldout ircadb:../shared/data/ircadb-01   # → bench/results/recipe_liver_tumour_cpu_heldout_ircadb01.json
    python bench/tumour_recipe.py --heldout ircadb:../shared/data/ircadb-01 --set train.max_steps=20 \
        --set cascade.stage2.train.max_steps=20 --out /tmp/t.json     # a smoke run (stage 2 keeps its own keys)

Every ``--heldout KIND:PATH`` source is removed from the config's sources (the store is then another
store, ``…-minus-<names>.zarr``), converted into a store of its own and evaluated whole (``--split
all``) with the run's inference settings. Reported per held-out case and pooled over them: tumour
Dice (pooled = from the summed tp/fp/fn), lesion detection (``metrics.json`` ``lesions``: recall,
precision, F1, any-overlap and IoU ≥ 0.5), whole-liver Dice (liver ∪ tumour), volumes; training
minutes per stage (from each stage's ``metrics.jsonl``: a rerun that finds both stages trained only
re-scores them, ``--resume latest``) and their sum, samples/s. Nothing here chooses anything: the
config runs as written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/liver_tumour_cpu.yaml"


def _without(raw: dict, heldout: list[tuple[str, str]], work: Path) -> dict:
    """The config's data sources minus the held-out ones (matched by resolved path)."""
    gone = {(ROOT / p).resolve() for _, p in heldout}
    d = raw["data"]
    sources = [{"kind": d["kind"], "path": d["source"]}] + list(d.get("extra_sources", []))
    kept = [s for s in sources if (ROOT / s["path"]).resolve() not in gone]
    if len(kept) == len(sources):
        raise SystemExit(f"none of {[p for _, p in heldout]} is a source of the config")
    names = "-".join(Path(p).name for _, p in heldout)
    d.update(kind=kept[0]["kind"], source=kept[0]["path"], extra_sources=kept[1:],
             store=str(work / f"{Path(d['store']).stem}-minus-{names}.zarr"))
    raw["name"] = f"{raw['name']}-minus-{names}"
    return raw


def _stage_minutes(run: Path) -> dict:
    """Minutes of each stage: the sum over its processes' lifetimes (a resume starts a new one: the
    time between is not training)."""
    out = {}
    for stage in ("stage1", "stage2"):
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
        starts = [i for i, r in enumerate(rows) if r.get("type") == "startup"] or [0]
        spans = [rows[a:b] for a, b in zip(starts, starts[1:] + [len(rows)])]
        seconds = sum(span[-1]["time"] - span[0]["time"] for span in spans if span)
        train = [r for r in rows if r.get("type") == "train"]
        out[stage] = {"minutes": round(seconds / 60, 2), "steps": train[-1]["step"],
                      "samples_per_s": round(train[-1].get("samples_per_s", 0.0), 2)}
    return out


def _evaluate(model: Path, store: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "hpc_seg", "evaluate", str(model), "--data", str(store), "--split", "all",
                    "--out", str(out), "--cpu", "--tag", "latest"], check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())


def _figures(res: dict) -> dict:
    """Per case and pooled tumour / whole-liver figures of one evaluation."""
    cases = {}
    for row in res["per_case"]:
        pc = row["per_class"]
        cases[row["case"]] = {"tumour_dice": pc["tumour"]["dice"], "whole_liver_dice": pc["liver+tumour"]["dice"],
                              "tumour_voxels_ref": pc["tumour"]["voxels_gt"],
                              "tumour_voxels_pred": pc["tumour"]["voxels_pred"],
                              "lesions": {k: row.get("lesions", {}).get(k) for k in
                                          ("reference", "predicted", "detected", "detected_iou50", "false_positives",
                                           "recall", "precision")},
                              "volumes_ml": row.get("volumes_ml")}
    t = res["per_class"]["tumour"]
    return {"cases": cases, "pooled_tumour": {k: t.get(k) for k in ("tp", "fp", "fn", "dice", "iou")},
            "lesions": res.get("lesions"), "note": res.get("note")}


def _pool(figs: list[dict]) -> dict:
    tp, fp, fn = (sum(f["pooled_tumour"][k] or 0 for f in figs) for k in ("tp", "fp", "fn"))
    les = [f["lesions"] for f in figs if f["lesions"]]
    ref, det = sum(x["reference"] for x in les), sum(x["detected"] for x in les)
    pred, matched = sum(x["predicted"] for x in les), sum(x["predicted_matched"] for x in les)
    whole = [c["whole_liver_dice"] for f in figs for c in f["cases"].values() if c["whole_liver_dice"] is not None]
    return {"tumour_dice_pooled": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None,
            "lesion_recall": det / ref if ref else None, "lesion_precision": matched / pred if pred else None,
            "lesion_recall_iou50": sum(x["detected_iou50"] for x in les) / ref if ref else None,
            "reference_lesions": ref, "predicted_lesions": pred,
            "whole_liver_dice_mean": sum(whole) / len(whole) if whole else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--heldout", action="append", required=True, metavar="KIND:PATH")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None, help="default: bench/results/recipe_<config name>_heldout_<cases>.json")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "recipes"), help="stores, run directories, evaluations")
    args = ap.parse_args(argv)
    from hpc_seg.config import load_raw

    heldout = [tuple(h.split(":", 1)) for h in args.heldout]
    work = Path(args.work).resolve()
    raw = _without(load_raw(ROOT / args.config), heldout, work)
    names = "_".join(Path(p).name.replace("-", "") for _, p in heldout)
    if args.overrides:  # another run: its own directory and result file, never the recipe's
        tag = hashlib.sha256("\n".join(args.overrides).encode()).hexdigest()[:8]
        raw["name"] += f"-sets-{tag}"
        names += f"_sets_{tag}"
    args.out = args.out or str(ROOT / "bench" / "results" / f"recipe_{raw['name'].split('-minus-')[0]}_heldout_{names}.json")
    cfg_path = work / f"{raw['name']}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = work / raw["name"]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "hpc_seg", "train", "--config", str(cfg_path), "--run-dir", str(run),
                    "--resume", "latest", *[a for s in args.overrides for a in ("--set", s)]], check=True, cwd=ROOT)
    minutes = (time.time() - t0) / 60
    stages = _stage_minutes(run)
    result = {"config": args.config, "overrides": args.overrides, "trained_on": [raw["data"]["source"]] +
              [s["path"] for s in raw["data"]["extra_sources"]], "heldout": args.heldout,
              "train_minutes": round(sum(v["minutes"] for v in stages.values()), 2),
              "this_invocation_minutes": round(minutes, 2), "stages": stages, "cascade": [], "stage1_alone": []}
    for kind, path in heldout:
        store = work / f"heldout-{kind}-{Path(path).name}.zarr"
        if not (store / "zarr.json").is_file():
            subprocess.run([sys.executable, "-m", "hpc_seg", "convert", kind, path, str(store)], check=True, cwd=ROOT)
        for key, model in (("cascade", run), ("stage1_alone", run / "stage1")):
            res = _evaluate(model, store, run / f"eval-{key}-{Path(path).name}")
            result[key].append({"source": f"{kind}:{path}", "tta": res["tta"], "postprocess": res["postprocess"],
                                "seconds": round(res["seconds"], 1), **_figures(res)})
    result["pooled"] = {k: _pool(result[k]) for k in ("cascade", "stage1_alone")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"minutes": result["train_minutes"], "stages": result["stages"],
                      "pooled": result["pooled"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
