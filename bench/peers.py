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


def _hpc(*args: str, device: str = "cuda") -> None:
    """An ``hpc-seg`` command; ``device`` cpu hides the GPUs from it (training picks its accelerator itself)."""
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"} if device == "cpu" else {}))
    subprocess.run([sys.executable, "-m", "hpc_seg", *args], check=True, cwd=ROOT, env=env)


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


def _same_inputs(work: Path, inputs: dict) -> None:
    """A work directory serves one set of inputs (its stores, runs and predictions are reused): refuse others."""
    path = work / "peers-inputs.json"
    inputs = json.loads(json.dumps(inputs))  # as the file holds them (tuples as lists)
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
        if changed:
            raise SystemExit(f"{work}: made with other {', '.join(changed)} ({path}); use another --work or delete it")
    else:
        path.write_text(json.dumps(inputs, indent=1))


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


def _minutes_of(rows: list[dict], kind: str) -> list[tuple[float, dict]]:
    """(training minutes, record) of each ``kind`` record: from each process's first batch, processes
    summed (a resume starts a new one; the time between is not training)."""
    out, before, start, last = [], 0.0, None, None
    for x in rows:
        if x.get("type") == "startup" and start is not None:
            before, start = before + (last - start), None
        elif x.get("type") == "loader_start" and start is None:
            start = x["time"]
        last = x.get("time", last)
        if x.get("type") == kind and start is not None:
            out.append(((before + x["time"] - start) / 60, x))
    return out


def _val_curve(rows: list[dict], target: str) -> list[dict]:
    """hpc-seg's own validation during training (at the model's input size, as the trainer validates)."""
    return [{"minutes": round(m, 2), "iou": x[f"iou_{target}"], "step": x["step"]}
            for m, x in _minutes_of(rows, "val") if x.get(f"iou_{target}") is not None]


def _hpc_curve(args, run: Path, curve_set) -> list[dict]:
    """Every checkpoint of a one-stage run scored on the curve set without mirroring (on the store's
    grid, as nnU-Net's snapshots are); a cascade: none (its final model is the one point)."""
    if len(_runs(run)) > 1:
        return []
    name, store, split, _ = curve_set
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = []
    for minutes, rec in _minutes_of(rows, "checkpoint"):
        if not (run / "checkpoints" / rec["tag"]).is_dir() or any(c["tag"] == rec["tag"] for c in curve):
            continue
        out = run.parent / f"curve-hpc-seg-{name}" / rec["tag"]
        if not (out / "metrics.json").is_file():
            _hpc("evaluate", str(run), "--data", str(store), "--split", split, "--out", str(out), "--tag", rec["tag"],
                 "--no-tta", *(["--limit", str(args.limit)] if args.limit else []),
                 *(["--cpu"] if args.device == "cpu" else []), device=args.device)
        res = json.loads((out / "metrics.json").read_text())
        curve.append({"minutes": round(minutes, 2), "iou": res["per_class"][args.target]["iou"], "tag": rec["tag"],
                      "step": rec["step"]})
    return curve


def _hpc_system(run: Path, target: str, stage_cfgs: list) -> dict:
    """Training minutes (the budget's clock), steps, samples and pixels per training second (the
    budget's seconds: validation and checkpoints included, as nnU-Net's are) and the validation curve."""
    seconds, steps, samples, pixels, curve = 0.0, [], 0, 0, []
    for r, c in zip(_runs(run), stage_cfgs):
        final = json.loads((r / "final.json").read_text())
        seconds += final["train_seconds"]
        steps.append(final["step"])
        n = final["step"] * c.data.batch_size * c.train.grad_accum * final["world_size"]
        samples, pixels = samples + n, pixels + n * c.data.size[0] * c.data.size[1]
        rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if x.strip()]
        curve += _val_curve(rows, target)
    return {"minutes": {"training": round(seconds / 60, 2)}, "steps": steps, "samples": samples,
            "samples_per_s": round(samples / max(seconds, 1e-9), 2), "pixels_per_s": round(pixels / max(seconds, 1e-9)),
            "input_sizes": [list(c.data.size) for c in stage_cfgs], "validation_during_training": curve}


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


def _hpc_evaluate(run: Path, store: Path, split: str, out: Path, limit: int | None, device: str, tag: str) -> dict:
    args = ["evaluate", str(run), "--data", str(store), "--split", split, "--out", str(out), "--tag", tag]
    _hpc(*args, *(["--limit", str(limit)] if limit else []), *(["--cpu"] if device == "cpu" else []), device=device)
    return json.loads((out / "metrics.json").read_text())


def run_hpc(args, cfg_path: Path, cfg, work: Path, evals: dict, seed: int, curve_set) -> tuple[dict, dict]:
    """Train the recipe for ``args.minutes``; (system, results): its figures on every evaluation set
    and its checkpoints' curve."""
    from hpc_seg.config.cascade import stage_configs
    from hpc_seg.ingest.catalog import Store

    run = work / f"hpc-seg-{args.minutes:g}min"
    t0 = time.time()
    sets = [*args.overrides, *_budget_sets(cfg, args.minutes), "checkpoint.keep_last=1000"]  # all: the curve
    _hpc("train", "--config", str(cfg_path), "--run-dir", str(run), "--resume", "latest",
         *[a for s in sets for a in ("--set", s)], device=args.device)
    stage_cfgs = [c for _, c in stage_configs(cfg)] if cfg.cascade.enabled else [cfg]
    system = _hpc_system(run, args.target, stage_cfgs)
    took = run / "peers-train-command.json"  # the first command's minutes (a rerun finds the run trained)
    if not took.is_file():
        took.write_text(json.dumps({"seconds": time.time() - t0}))
    system["minutes"]["train_command"] = round(json.loads(took.read_text())["seconds"] / 60, 2)
    results, seconds = {}, 0.0
    tag = "best" if Store.open(cfg.data.store).split(seed)["val"] else "latest"  # best: chosen on validation
    for name, (store, split) in evals.items():
        res = _hpc_evaluate(run, store, split, work / f"eval-hpc-seg-{name}", args.limit, args.device, tag)
        results[name] = nnu.figures(res)
        seconds += res["seconds"]
        results[name]["tta"], results[name]["postprocess"] = res["tta"], res["postprocess"]
    system["minutes"]["inference"] = round(seconds / 60, 2)
    system["curve"] = _hpc_curve(args, run, curve_set)
    return system, results


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
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.target = TASKS[args.task]["target"]
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    args.started = time.time()
    work = Path(args.work or ROOT / "outputs" / "peers" / args.task).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or ROOT / "bench" / "results" / f"peers_{args.task}.json")
    raw, cfg_path = _config(args, work)
    cfg = _load(cfg_path, args.overrides)  # a bad override is refused before the work directory is claimed
    _same_inputs(work, {"task": args.task, "config": raw, "overrides": args.overrides, "heldout": args.heldout,
                        "eval": args.eval, "limit": args.limit, "device": args.device})
    from hpc_seg.ingest.catalog import Store
    from hpc_seg.ingest.prepare import is_prepared, prepare_for_config
    from hpc_seg.preprocessing.plan import read_plan

    prepared = work / "hpc-seg-prepared.json"  # its minutes, kept for reruns
    if not is_prepared(cfg.data.store, cfg.data.split_seed) or not prepared.is_file():
        t0 = time.time()
        prepare_for_config(cfg)
        prepared.write_text(json.dumps({"seconds": time.time() - t0}))
    prep_s = json.loads(prepared.read_text())["seconds"]
    split = Store.open(cfg.data.store).split(cfg.data.split_seed)
    plan = read_plan(cfg.data.store, cfg.data.split_seed)
    evals = _eval_sets(args, raw, work)
    first = next(iter(evals))
    curve_set = (("validation", Path(cfg.data.store), "val", split["val"][:args.limit]) if split["val"] else
                 (first, *evals[first], nnu.cases_of(*evals[first], cfg.data.split_seed, args.limit)))
    systems, results = {}, {}
    systems["hpc-seg"], results["hpc-seg"] = run_hpc(args, cfg_path, cfg, work, evals, cfg.data.split_seed,
                                                     curve_set)
    systems["hpc-seg"]["minutes"]["preprocessing"] = round(prep_s / 60, 2)
    budgets = [("nnunet", args.minutes)] + ([(f"nnunet-{args.peer_minutes:g}min", args.peer_minutes)]
                                            if args.peer_minutes else [])
    for name, minutes in budgets:
        systems[name], results[name] = nnu.run(args, cfg, work, evals, split, plan, minutes, curve_set,
                                               TASKS[args.task]["id"])
    return _report(args, cfg, systems, results, evals, curve_set, out)


def _report(args, cfg, systems: dict, results: dict, evals: dict, curve_set, out: Path) -> dict:
    hpc = systems["hpc-seg"]
    if not hpc["curve"] and curve_set[0] in results["hpc-seg"]:  # a cascade: its final model on the curve set
        hpc["curve"] = [{"minutes": hpc["minutes"]["training"],
                         "iou": results["hpc-seg"][curve_set[0]]["per_class"][args.target]["iou"]}]
    report = {"task": args.task, "minutes": args.minutes, "peer_minutes": args.peer_minutes, "device": args.device,
              "config": str(args.config or TASKS[args.task]["config"]), "overrides": args.overrides,
              "heldout": args.heldout, "eval": {k: [str(v[0]), v[1]] for k, v in evals.items()},
              "curve_set": curve_set[0], "target": args.target, "mirroring": cfg.inference.tta,
              "cpu_count": os.cpu_count(), "results": results, "systems": systems,
              "this_invocation_minutes": round((time.time() - args.started) / 60, 2)}  # reused parts count 0
    from hpc_seg.storage.atomic import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report, indent=1)
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
