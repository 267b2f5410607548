"""hpc-seg beside nnU-Net v2 on the same data, machine and minutes, scored by hpc-seg's metric code.

    python bench/peers.py --task liver --minutes 10 --peer-minutes 30      # → bench/results/peers_liver.json + .png
    python bench/peers.py --task kvasir --minutes 20 --peer-minutes 60     # → bench/results/peers_kvasir.json + .png

1. The task's training data, prepared once by hpc-seg (``hpc-seg prepare``, the config's split):
   kvasir — ``configs/kvasir_cpu.yaml`` (train/val/test of ../shared/data/kvasir-seg); liver — the
   CTs of ``configs/liver_tumour_cpu.yaml`` minus ``--heldout`` (default ircadb-01, as the tumour recipe).
2. hpc-seg trains that recipe with ``train.max_minutes`` = M (the recipe's schedule compressed to
   the budget when it would run longer; a cascade splits M between its stages by steps × pixels).
3. nnU-Net v2 gets the same training (and validation) cases from the same store (``peers_nnunet``),
   plans and preprocesses them (``-c 2d``, integrity verified), trains its ``2d`` configuration for
   M minutes (``bench/nnunet_ext``: its poly LR decays over the minutes) and, with ``--peer-minutes``,
   once more for that budget; its predictor runs on every evaluation set.
4. Every system's labels are scored by ``hpc_seg.evaluation.score`` on the same store cases;
   test-time mirroring is the recipe's ``inference.tta`` for both (kvasir: the 4 in-plane
   mirrorings; liver: none), the liver post-processing is hpc-seg's own (nnU-Net: none, as its
   ``2d`` configuration predicts without ``nnUNetv2_apply_postprocessing``).
5. JSON: ``results[system][eval] = per_class`` (+ mean per image/case), ``systems[system]`` =
   minutes (preprocessing, training, inference), steps or epochs, samples/s; one PNG of accuracy
   against training minutes (validation cases where the recipe has them, else the first
   evaluation set: nothing is chosen on either; nnU-Net's curve from its snapshots, scored without
   mirroring as hpc-seg's validation is).

``--eval NAME=KIND:PATH`` adds evaluation sets (converted by hpc-seg, all their cases). ``--device``
cuda runs both on one GPU with the same command. The whole run takes about (2 + P/M) × M minutes,
plus preprocessing and inference (docs/peers.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_nnunet as nnu  # noqa: E402
from tumour_recipe import _without  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"kvasir": {"config": "configs/kvasir_cpu.yaml", "id": 501, "target": "polyp"},
         "liver": {"config": "configs/liver_tumour_cpu.yaml", "id": 502, "target": "tumour",
                   "heldout": "ircadb:../shared/data/ircadb-01"}}


def _hpc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hpc_seg", *args], check=True, cwd=ROOT)


def _config(args, work: Path) -> tuple[dict, Path]:
    """The recipe's config as this run trains it (held-out sources removed, overrides applied)."""
    from hpc_seg.config import load_raw

    raw = load_raw(ROOT / (args.config or TASKS[args.task]["config"]))
    if args.heldout:
        raw = _without(raw, [tuple(h.split(":", 1)) for h in args.heldout], work)
    raw["data"]["store"] = str(work / Path(raw["data"]["store"]).name)
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw, path


def _load(path: Path, sets: list[str]):
    from hpc_seg.config import load_config

    return load_config(path, sets)


def _budget_sets(cfg, minutes: float) -> list[str]:
    """``train.max_minutes`` for the recipe; a cascade shares M by each stage's steps × pixels."""
    if not cfg.cascade.enabled:
        return [f"train.max_minutes={minutes}"]
    from hpc_seg.config.cascade import stage_configs

    (_, one), (_, two) = stage_configs(cfg)
    work = [c.train.max_steps * c.data.size[0] * c.data.size[1] for c in (one, two)]
    first = round(minutes * work[0] / sum(work), 3)
    return [f"train.max_minutes={first}", f"cascade.stage2.train.max_minutes={round(minutes - first, 3)}"]


def _runs(run: Path) -> list[Path]:
    return [run / s for s in ("stage1", "stage2")] if (run / "stage1").is_dir() else [run]


def _val_curve(rows: list[dict], target: str) -> list[dict]:
    """Validation IoU against training minutes: from each process's first batch, processes summed
    (a resume starts a new one; the time between is not training)."""
    curve, before, start, last = [], 0.0, None, None
    for x in rows:
        if x.get("type") == "startup" and start is not None:
            before, start = before + (last - start), None
        elif x.get("type") == "loader_start" and start is None:
            start = x["time"]
        last = x.get("time", last)
        if x.get("type") == "val" and x.get(f"iou_{target}") is not None and start is not None:
            curve.append({"minutes": round((before + x["time"] - start) / 60, 2), "iou": x[f"iou_{target}"],
                          "step": x["step"]})
    return curve


def _hpc_system(run: Path, target: str) -> dict:
    """Training minutes (the budget's clock), steps, samples/s and the validation curve of a run."""
    seconds, steps, speed, curve = 0.0, [], [], []
    for r in _runs(run):
        final = json.loads((r / "final.json").read_text())
        seconds += final["train_seconds"]
        steps.append(final["step"])
        rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train = [x for x in rows if x.get("type") == "train" and x.get("samples_per_s")]
        speed.append(sum(x["samples_per_s"] for x in train) / max(len(train), 1))
        curve += _val_curve(rows, target)
    return {"minutes": {"training": round(seconds / 60, 2)}, "steps": steps,
            "samples_per_s": round(sum(speed) / len(speed), 2), "curve": curve}


def _eval_sets(args, raw: dict, work: Path) -> dict[str, tuple[Path, str]]:
    """name → (store, split): ``--eval`` sets (converted once) or the task's default."""
    sets = list(args.eval)
    if not sets and args.heldout:
        sets = [f"{Path(p).name}={h}" for h in args.heldout for p in [h.split(':', 1)[1]]]
    if not sets:
        return {"test": (Path(raw["data"]["store"]), "test")}
    out = {}
    for item in sets:
        name, spec = item.split("=", 1)
        kind, path = spec.split(":", 1)
        store = work / f"eval-{name}.zarr"
        if not (store / "zarr.json").is_file():
            _hpc("convert", kind, path, str(store))
        out[name] = (store, "all")
    return out


def _cases(store: Path, split: str, seed: int, limit: int | None) -> list[str]:
    from hpc_seg.ingest.catalog import Store

    s = Store.open(store)
    return (s.case_ids if split == "all" else s.split(seed)[split])[:limit]


def _per_case_means(res: dict) -> dict:
    out = {}
    for name in res["per_class"]:
        rows = [r["per_class"].get(name) or {} for r in res["per_case"]]
        dice = [r["dice"] for r in rows if r.get("dice") is not None]
        iou = [r["iou"] for r in rows if r.get("iou") is not None]
        out[name] = {"mean_dice_per_case": sum(dice) / len(dice) if dice else None,
                     "mean_iou_per_case": sum(iou) / len(iou) if iou else None}
    return out


def _figures(res: dict) -> dict:
    return {"per_class": res["per_class"], "per_case_mean": _per_case_means(res), "cases": res["cases"],
            "lesions": res.get("lesions"), "note": res.get("note")}


def _hpc_evaluate(run: Path, store: Path, split: str, out: Path, limit: int | None, device: str, tag: str) -> dict:
    args = ["evaluate", str(run), "--data", str(store), "--split", split, "--out", str(out), "--tag", tag]
    _hpc(*args, *(["--limit", str(limit)] if limit else []), *(["--cpu"] if device == "cpu" else []))
    return json.loads((out / "metrics.json").read_text())


def run_hpc(args, cfg_path: Path, cfg, work: Path, evals: dict, seed: int) -> tuple[dict, dict]:
    from hpc_seg.ingest.catalog import Store

    run = work / "hpc-seg"
    t0 = time.time()
    sets = [*args.overrides, *_budget_sets(cfg, args.minutes)]
    _hpc("train", "--config", str(cfg_path), "--run-dir", str(run), "--resume", "latest",
         *[a for s in sets for a in ("--set", s)])
    system = _hpc_system(run, args.target)
    system["minutes"]["train_command"] = round((time.time() - t0) / 60, 2)
    results, seconds = {}, 0.0
    tag = "best" if Store.open(cfg.data.store).split(seed)["val"] else "latest"  # best: chosen on validation
    for name, (store, split) in evals.items():
        res = _hpc_evaluate(run, store, split, work / f"eval-hpc-seg-{name}", args.limit, args.device, tag)
        results[name] = _figures(res)
        seconds += res["seconds"]
        results[name]["tta"], results[name]["postprocess"] = res["tta"], res["postprocess"]
    system["minutes"]["inference"] = round(seconds / 60, 2)
    return system, results


def _nnunet_score(env: dict, task_id: int, task: str, fold: str, store: Path, cases: list[str], folder: Path, plan,
                  device: str, mirror: bool, log: Path, checkpoint: str = "checkpoint_final.pth") -> tuple[dict, float]:
    from hpc_seg.evaluation.score import score_labels
    from hpc_seg.ingest.catalog import Store

    s = Store.open(store)
    images = folder / "images"
    if not images.is_dir():
        ending = [nnu.write_case(s, c, images, None, nnu.case_key(c)) for c in cases][-1]
    else:
        ending = ".png" if any(images.glob("*.png")) else ".nii.gz"
    out = folder / f"pred-{checkpoint.split('.')[0]}{'-mirrored' if mirror else ''}"
    done = out.is_dir() and all((out / f"{nnu.case_key(c)}{ending}").is_file() for c in cases)
    seconds = 0.0 if done else nnu.predict(env, task_id, task, fold, images, out, device, mirror, log, checkpoint)
    res = score_labels(s, plan, cases, lambda c: nnu.read_prediction(out, c, ending))
    return res, seconds


def _nnunet_system(folder: Path, pre_s: float, train_s: float) -> dict:
    timing = json.loads((folder / "timing.json").read_text())
    train_only = timing["train_seconds"] - timing["validation_seconds"]
    return {"minutes": {"preprocessing": round(pre_s / 60, 2), "training": round(timing["train_seconds"] / 60, 2),
                        "train_command": round(train_s / 60, 2)},
            "epochs": timing["epochs"], "iterations": timing["train_iterations"],
            "batch_size": timing["batch_size"], "patch_size": timing["patch_size"],
            "samples_per_s": round(timing["train_iterations"] * timing["batch_size"] / max(train_only, 1e-9), 2),
            "validation_minutes": round(timing["validation_seconds"] / 60, 2)}


def run_nnunet(args, cfg, work: Path, evals: dict, split: dict, plan, minutes: float, curve_set) -> tuple[dict, dict]:
    """Train nnU-Net for ``minutes``; its figures on every evaluation set and its snapshot curve."""
    scratch = work / "nnunet"
    env = nnu.environment(scratch)
    env["nnUNet_results"] = str(scratch / f"results-{minutes:g}min")
    Path(env["nnUNet_results"]).mkdir(parents=True, exist_ok=True)
    log = scratch / f"nnunet-{minutes:g}min.log"
    task_id = TASKS[args.task]["id"]
    fold = "0" if split["val"] else "all"
    pre_s = _nnunet_prepare(args, env, cfg, split, task_id, scratch / "nnunet-preprocess.log")
    folder = nnu.model_folder(env, task_id, args.task, fold)
    fracs = (0.25, 0.5, 0.75)
    train_s = 0.0 if (folder / "checkpoint_final.pth").is_file() else nnu.train(
        env, task_id, fold, minutes, args.device, log, snapshots=fracs)
    system = _nnunet_system(folder, pre_s, train_s)
    results, seconds = {}, 0.0
    for name, (store, sp) in evals.items():
        res, s = _nnunet_score(env, task_id, args.task, fold, store, _cases(store, sp, cfg.data.split_seed, args.limit),
                               work / f"eval-nnunet-{minutes:g}min-{name}", plan, args.device, cfg.inference.tta, log)
        results[name], seconds = _figures(res), seconds + s
        results[name]["tta"], results[name]["postprocess"] = cfg.inference.tta, False
    system["minutes"]["inference"] = round(seconds / 60, 2)
    system["curve"] = _nnunet_curve(env, task_id, fold, folder, curve_set, plan, args, work, minutes, log)
    return system, results


def _nnunet_prepare(args, env: dict, cfg, split: dict, task_id: int, log: Path) -> float:
    """Raw dataset + plan and preprocess, once per work directory (its seconds remembered)."""
    done = Path(env["nnUNet_preprocessed"]) / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    from hpc_seg.ingest.catalog import Store

    t0 = time.time()
    cases = split["train"] + split["val"]
    nnu.write_raw(Store.open(cfg.data.store), cases, Path(env["nnUNet_raw"]), task_id, args.task)
    nnu.plan_and_preprocess(env, task_id, log)
    nnu.write_splits(Path(env["nnUNet_preprocessed"]), task_id, args.task, split["train"], split["val"])
    seconds = time.time() - t0
    done.write_text(json.dumps({"seconds": seconds, "cases": len(cases)}))
    return seconds


def _nnunet_curve(env, task_id, fold, folder: Path, curve_set, plan, args, work: Path, minutes: float, log) -> list:
    """Snapshots (and the final checkpoint) scored on the curve set without mirroring."""
    timing = json.loads((folder / "timing.json").read_text())
    points = [(name, snap["minutes"]) for name, snap in timing["snapshots"].items()]
    points.append(("checkpoint_final.pth", timing["train_seconds"] / 60))
    name, store, cases = curve_set
    curve = []
    for chk, at in points:
        res, _ = _nnunet_score(env, task_id, args.task, fold, store, cases, work / f"eval-nnunet-{minutes:g}min-{name}",
                               plan, args.device, False, log, checkpoint=chk)
        curve.append({"minutes": round(at, 2), "iou": res["per_class"][args.target]["iou"], "checkpoint": chk})
    return curve


def plot(curves: dict[str, list[dict]], finals: dict[str, tuple[float, float]], path: Path, title: str,
         ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, curve in curves.items():
        if curve:
            line, = ax.plot([c["minutes"] for c in curve], [c["iou"] for c in curve], marker="o", label=name)
            if name in finals:
                ax.scatter(*finals[name], marker="*", s=140, color=line.get_color(), zorder=3)
    ax.set(xlabel="training minutes", ylabel=ylabel, title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--minutes", type=float, required=True, help="training budget of each system")
    ap.add_argument("--peer-minutes", type=float, default=None, help="also train nnU-Net for this budget")
    ap.add_argument("--eval", action="append", default=[], metavar="NAME=KIND:PATH")
    ap.add_argument("--heldout", action="append", default=None, metavar="KIND:PATH",
                    help="liver: sources left out of training and evaluated (default: ircadb-01)")
    ap.add_argument("--config", default=None, help="default: the task's recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="hpc-seg config overrides")
    ap.add_argument("--limit", type=int, default=None, help="at most this many cases per evaluation set")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--work", default=None, help="default: outputs/peers/<task>")
    ap.add_argument("--out", default=None, help="default: bench/results/peers_<task>.json")
    args = ap.parse_args(argv)
    if args.heldout is None and args.task == "liver":
        args.heldout = [TASKS["liver"]["heldout"]]
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.target = TASKS[args.task]["target"]
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    work = Path(args.work or ROOT / "outputs" / "peers" / args.task).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or ROOT / "bench" / "results" / f"peers_{args.task}.json")
    raw, cfg_path = _config(args, work)
    cfg = _load(cfg_path, args.overrides)
    from hpc_seg.ingest.catalog import Store
    from hpc_seg.ingest.prepare import is_prepared, prepare_for_config
    from hpc_seg.preprocessing.plan import read_plan

    t0 = time.time()
    if not is_prepared(cfg.data.store, cfg.data.split_seed):
        prepare_for_config(cfg)
    prep_s = time.time() - t0
    split = Store.open(cfg.data.store).split(cfg.data.split_seed)
    plan = read_plan(cfg.data.store, cfg.data.split_seed)
    evals = _eval_sets(args, raw, work)
    first = next(iter(evals))
    curve_set = (("validation", Path(cfg.data.store), split["val"]) if split["val"] else
                 (first, evals[first][0], _cases(*evals[first], cfg.data.split_seed, args.limit)))
    systems, results = {}, {}
    systems["hpc-seg"], results["hpc-seg"] = run_hpc(args, cfg_path, cfg, work, evals, cfg.data.split_seed)
    systems["hpc-seg"]["minutes"]["preprocessing"] = round(prep_s / 60, 2)
    budgets = [("nnunet", args.minutes)] + ([(f"nnunet-{args.peer_minutes:g}min", args.peer_minutes)]
                                            if args.peer_minutes else [])
    for name, minutes in budgets:
        systems[name], results[name] = run_nnunet(args, cfg, work, evals, split, plan, minutes, curve_set)
    return _report(args, cfg, systems, results, evals, curve_set, out)


def _report(args, cfg, systems: dict, results: dict, evals: dict, curve_set, out: Path) -> dict:
    hpc = systems["hpc-seg"]
    if not hpc["curve"]:  # no validation split: its one point is the final model on the curve set
        hpc["curve"] = [{"minutes": hpc["minutes"]["training"],
                         "iou": results["hpc-seg"][curve_set[0]]["per_class"][args.target]["iou"]}]
    report = {"task": args.task, "minutes": args.minutes, "peer_minutes": args.peer_minutes, "device": args.device,
              "config": str(args.config or TASKS[args.task]["config"]), "overrides": args.overrides,
              "heldout": args.heldout, "eval": {k: [str(v[0]), v[1]] for k, v in evals.items()},
              "curve_set": curve_set[0], "target": args.target, "mirroring": cfg.inference.tta,
              "cpu_count": os.cpu_count(), "results": results, "systems": systems}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    finals = {name: (systems[name]["minutes"]["training"], results[name][curve_set[0]]["per_class"][args.target]["iou"])
              for name in systems if curve_set[0] in results[name]}
    plot({n: s["curve"] for n, s in systems.items()}, finals, out.with_suffix(".png"),
         f"{args.task}: {args.minutes:g} training minutes each ({args.device}, {os.cpu_count()} cores)",
         f"{args.target} IoU ({curve_set[0]})")
    _print(report)
    return report


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("system", "eval", "IoU", "Dice", "Dice/case", "train min", "samples/s", title="peers: " + report["task"])
    target = report["target"]
    for name, per_eval in report["results"].items():
        s = report["systems"][name]
        for ev, fig in per_eval.items():
            pc = fig["per_class"][target]
            t.add_row(name, ev, f"{pc['iou']:.3f}", f"{pc['dice']:.3f}",
                      f"{fig['per_case_mean'][target]['mean_dice_per_case'] or 0:.3f}",
                      f"{s['minutes']['training']:.1f}", f"{s['samples_per_s']:.1f}")
    Console().print(t)


if __name__ == "__main__":
    main()
