"""Recipes that learn: train a shipped CPU config from a fresh checkout, evaluate on held-out data
(the test split: never trained on, never used to choose anything), write JSON and a row for bench/README.md.

    python bench/recipes.py --config configs/kvasir_cpu.yaml            # → bench/results/recipe_kvasir_cpu.json
    python bench/recipes.py --config configs/kvasir_cpu.yaml --set train.max_steps=50 --out /tmp/r.json
    python bench/recipes.py --config configs/liver_ct_cpu.yaml --heldout chaos:../shared/data/chaos-ct --postprocess

Reported: pooled IoU/Dice of the target class over all test images (``per_class.<class>``), the
mean per-image IoU and Dice beside it (the figure most Kvasir-SEG papers quote), training minutes,
the curve of validation IoU against minutes (validation split, PNG beside the JSON), samples/s.
The checkpoint evaluated is ``best`` — chosen on the validation split during training (the last
one when the config has no validation split) — as the config's ``inference`` section says (mirror TTA,
post-processing: settings chosen on validation data); the figures with the other TTA setting are
reported beside (``without_tta`` / ``with_tta``).

``--heldout KIND:PATH`` scores a separate source instead of the test split (converted once into
``outputs/recipes/heldout-KIND.zarr``, all its cases): for CT, the whole-liver Dice (liver ∪ tumour,
per case, as the LiTS liver score) on a case never trained on; a store marking fewer classes than
the model (CHAOS: liver only) is scored with tumour counted as liver. The tumour figures of the
training store's LiTS cases are reported beside it, labelled as cases the model was trained on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _per_image(res: dict, cls: str) -> dict:
    rows = [r["per_class"].get(cls) or {} for r in res["per_case"]]
    iou = [r["iou"] for r in rows if r.get("iou") is not None]
    dice = [r["dice"] for r in rows if r.get("dice") is not None]
    return {"mean_iou_per_image": sum(iou) / len(iou) if iou else None,
            "mean_dice_per_image": sum(dice) / len(dice) if dice else None, "images": len(rows)}


def _curve(run: Path, cls: str) -> list[dict]:
    recs = _records(run)
    t0 = recs[0]["time"]
    return [{"minutes": round((r["time"] - t0) / 60, 2), "step": r["step"], "val_iou": r.get(f"iou_{cls}")}
            for r in recs if r["type"] == "val"]


def plot(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([c["minutes"] for c in curve], [c["val_iou"] for c in curve], marker="o")
    ax.set(xlabel="training minutes (2 CPU cores)", ylabel="validation IoU", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--target-class", default=None, help="default: the last class (polyp, tumour, liver)")
    ap.add_argument("--heldout", default=None, metavar="KIND:PATH", help="score this source, not the test split")
    ap.add_argument("--postprocess", action="store_true", help="evaluate with the largest-component filter "
                    "(default: the config's inference.postprocess)")
    ap.add_argument("--tta", action="store_true", help="also evaluate with mirror test-time augmentation "
                    "(reported beside; a config with inference.tta gets the figures without it beside)")
    args = ap.parse_args(argv)
    from hpc_seg.config import load_config

    cfg = load_config(args.config, args.overrides)
    run = Path(args.run_dir or ROOT / "outputs" / "recipes" / cfg.name)
    out = Path(args.out or ROOT / "bench" / "results" / f"recipe_{cfg.name}.json")
    sets = [a for s in args.overrides for a in ("--set", s)]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "hpc_seg", "train", "--config", args.config, "--run-dir", str(run),
                    *sets], check=True, cwd=ROOT)
    train_min = (time.time() - t0) / 60
    pp = args.postprocess or cfg.inference.postprocess
    tta = cfg.inference.tta
    train = [r for r in _records(run) if r["type"] == "train"]
    result = {"config": args.config, "overrides": args.overrides, "model": f"{cfg.model.name}/{cfg.model.size}",
              "input": cfg.data.size, "steps": train[-1]["step"], "train_minutes_incl_prepare_and_val": train_min,
              "samples_per_s": train[-1]["samples_per_s"], "postprocess": pp, "tta": tta,
              "best_checkpoint": json.loads((run / "final.json").read_text())["best"]}
    if args.heldout:
        result.update(_heldout(run, cfg, args.heldout, pp))
    else:
        res = _evaluate(run, cfg.data.store, "test", run / "eval-test", pp)
        cls = args.target_class or list(res["per_class"])[-1]
        result.update({"test_images_or_cases": res["cases"], "class": cls, "pooled_iou": res["per_class"][cls]["iou"],
                       "pooled_dice": res["per_class"][cls]["dice"], **_per_image(res, cls), "curve": _curve(run, cls)})
        if tta or args.tta:  # the other setting, beside the recipe's figure
            res = _evaluate(run, cfg.data.store, "test", run / "eval-test-other", pp, tta=not tta)
            result["without_tta" if tta else "with_tta"] = {
                "pooled_iou": res["per_class"][cls]["iou"], "pooled_dice": res["per_class"][cls]["dice"],
                **_per_image(res, cls)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if result.get("curve"):
        plot(result["curve"], out.with_suffix(".png"), f"{cfg.name}: {result['class']} IoU vs minutes")
        print(f"| {cfg.name} | {result['model']} {cfg.data.size[0]}² | {result['steps']} | {train_min:.1f} | "
              f"{result['pooled_iou']:.3f} | {result['pooled_dice']:.3f} | {result['mean_iou_per_image']:.3f} | "
              f"{result['mean_dice_per_image']:.3f} |")
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "training_cases"}, indent=1))
    return result


def _evaluate(run: Path, store, split: str, out: Path, postprocess: bool, tta: bool | None = None) -> dict:
    """``tta`` None: as the run's config says (``inference.tta``, the recipe's setting)."""
    flags = ["--postprocess" if postprocess else "--no-postprocess"]
    flags += [] if tta is None else ["--tta" if tta else "--no-tta"]
    subprocess.run([sys.executable, "-m", "hpc_seg", "evaluate", str(run), "--data", str(store), "--split", split,
                    "--out", str(out), "--cpu", "--tag", "best", *flags], check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())


def _case_figures(res: dict, names: list[str]) -> dict:
    return {row["case"]: {n: row["per_class"][n]["dice"] for n in names if n in row["per_class"]}
            for row in res["per_case"]}


def _heldout(run: Path, cfg, spec: str, postprocess: bool) -> dict:
    """Whole-liver Dice on a held-out source; tumour Dice on the training store's LiTS cases."""
    kind, _, path = spec.partition(":")
    store = ROOT / "outputs" / "recipes" / f"heldout-{kind}.zarr"
    if not (store / "zarr.json").is_file():
        subprocess.run([sys.executable, "-m", "hpc_seg", "convert", kind, path, str(store)], check=True, cwd=ROOT)
    res = _evaluate(run, store, "all", run / f"eval-heldout-{kind}", postprocess)
    seen = _evaluate(run, cfg.data.store, "all", run / "eval-training-cases", postprocess)
    whole = [row["per_class"]["liver+tumour"]["dice"] for row in res["per_case"]]
    return {"heldout": {"source": spec, "cases": res["cases"], "note": res.get("note"),
                        "whole_liver_dice_per_case": _case_figures(res, ["liver+tumour"]),
                        "whole_liver_dice_mean": sum(whole) / len(whole),
                        "assd_mm": {r["case"]: r["per_class"]["liver+tumour"]["assd_mm"] for r in res["per_case"]}},
            "training_cases": {"note": "cases the model was trained on: not a held-out figure",
                               "dice": _case_figures(seen, ["liver", "tumour", "liver+tumour"])}}



if __name__ == "__main__":
    main()
