"""The console script: demo on the phantom end to end, inspect, config printing; the command line's
structure (one module per command group, one --config/--set, one error wrapper)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


# ---- the command line's structure: one module per command group, one --config/--set ----------------

USER_COMMANDS = {"prepare", "convert", "train", "export", "evaluate", "predict", "plan", "submit", "status",
                 "compare", "config", "demo", "split", "inspect", "phantom"}
CONFIG_COMMANDS = {"config", "train", "demo", "submit", "plan"}  # the ones that take --config/--set


def _group_commands(group) -> list[str]:
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    group.add_commands(sub)
    return list(sub.choices)


def test_help_lists_every_group_command():
    from hpc_seg.cli import GROUPS, command_names

    per_group = {g.__name__: _group_commands(g) for g in GROUPS}
    assert all(per_group.values()), per_group
    every = [c for cmds in per_group.values() for c in cmds]
    assert sorted(every) == sorted(command_names()) and set(every) == USER_COMMANDS
    for r in (run("--help"), subprocess.run([sys.executable, "-m", "hpc_seg.cli", "--help"], cwd=ROOT,
                                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})):
        assert r.returncode == 0, r.stderr
        listed = {line.split()[0] for line in r.stdout.splitlines() if line.startswith("    ") and line.split()}
        for group, cmds in per_group.items():
            assert set(cmds) <= listed, f"{group}: {set(cmds) - listed} missing from hpc-seg --help"


def test_config_and_set_come_from_one_function():
    """Every parser taking --config/--set gets them from hpc_seg.config.cli_args.add_config_args: the
    same options on every sub-command (and under ``python -m hpc_seg.train``), declared nowhere else."""
    import argparse
    import re

    from hpc_seg.cli import parser
    from hpc_seg.train import add_train_args

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))

    def set_action(p):
        return next((a for a in p._actions if "--set" in a.option_strings), None)

    having = {name for name, p in sub.choices.items() if set_action(p)}
    assert having == CONFIG_COMMANDS
    standalone = add_train_args(argparse.ArgumentParser())
    shapes = {(a.dest, a.metavar, a.help, tuple(a.default), type(a).__name__)
              for a in [set_action(sub.choices[c]) for c in sorted(having)] + [set_action(standalone)]}
    assert len(shapes) == 1, shapes
    for cmd in sorted(having):
        ns = parser().parse_args([cmd, "--config", "x.yaml", "--set", "a.b=1", "--set", "c.d=[1,2]"])
        assert (ns.config, ns.overrides) == ("x.yaml", ["a.b=1", "c.d=[1,2]"]), cmd
    ns = standalone.parse_args(["--config", "x.yaml", "--set", "a.b=1"])
    assert (ns.config, ns.overrides) == ("x.yaml", ["a.b=1"])
    declared = [f"{p.relative_to(ROOT)}" for p in sorted((ROOT / "hpc_seg").rglob("*.py"))
                if re.search(r"""add_argument\(\s*["']--(?:config|set)["']""", p.read_text())]
    assert declared == ["hpc_seg/config/cli_args.py"], declared
    assert not [p for p in (ROOT / "hpc_seg").rglob("*.py") if "def build_parser" in p.read_text()]


def _one_error_line(r, prog: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"{prog}: error: "), r.stderr


def test_bad_set_is_one_line_and_exit_2():
    _one_error_line(run("config", "--set", "nonsense"), "hpc-seg config")
    _one_error_line(run("config", "--config", "tiny_cpu.yaml", "--set", "data.bogus=1"), "hpc-seg config")
    train = [sys.executable, "-m", "hpc_seg.train", "--config", "tiny_cpu.yaml"]
    for bad in ("nonsense", "data.bogus=1"):
        r = subprocess.run([*train, "--set", bad], cwd=ROOT, capture_output=True, text=True, timeout=300)
        _one_error_line(r, "hpc-seg train")
    r = subprocess.run([sys.executable, "launch/submit.py", "--config", "tiny_cpu.yaml", "--set", "nonsense"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    _one_error_line(r, "hpc-seg submit")


def test_inspect_old_plan_option_warns_and_works(phantom_store, capsys):
    from hpc_seg.cli import main

    assert main(["inspect", str(phantom_store), "--preprocessing-plan", "0"]) == 0
    new = capsys.readouterr()
    assert '"split_seed": 0' in new.out and "warning" not in new.err
    assert main(["inspect", str(phantom_store), "--plan", "0"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out
    assert "warning" in old.err and "--preprocessing-plan" in old.err
    assert main(["inspect", str(phantom_store)]) == 0
    assert '"split_seed"' not in capsys.readouterr().out
    assert "--plan " not in run("inspect", "--help").stdout  # hidden: only the new name is offered


def test_memory_plan_channels_follow_the_plan_rule(tmp_path):
    """Without a prepared store, ``hpc-seg plan`` takes the model's channels from the kind's facts by
    the preprocessing plan's rule; a kind whose classes come from the source (MSD) needs the store."""
    import pytest

    from hpc_seg.memory_plan.planner import model_channels
    from hpc_seg.config import load_config
    from hpc_seg.errors import HpcSegError

    absent = f"data.store={tmp_path / 'absent.zarr'}"
    assert model_channels(load_config("tiny_cpu.yaml", [absent, "data.kind=lits", "data.mode=2d"])) == (1, 3)
    assert model_channels(load_config("tiny_cpu.yaml", [absent, "data.kind=lits", "data.mode=2.5d",
                                                  "data.slices=5"])) == (5, 3)
    assert model_channels(load_config("tiny_cpu.yaml", [absent, "data.kind=kvasir", "data.mode=2d",
                                                  "loss.kind=bce_dice"])) == (3, 1)
    with pytest.raises(HpcSegError, match="prepare it first.*hpc-seg prepare msd"):
        model_channels(load_config("tiny_cpu.yaml", [absent, "data.kind=msd"]))
    r = run("plan", "--config", "tiny_cpu.yaml", "--set", absent, "--set", "data.kind=msd")
    _one_error_line(r, "hpc-seg plan")
