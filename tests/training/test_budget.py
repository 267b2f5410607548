"""train.max_minutes: the schedule ends on the budget, training stops there, resumes carry the clock."""

import json
import math
from types import SimpleNamespace

import pytest

from hpc_seg.config import load_config
from hpc_seg.training.budget import TimeBudget
from hpc_seg.training.optim import lr_factor
from tests.runs import records, run_train

TR = SimpleNamespace(schedule="warmup_cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.01, poly_power=0.9)


def test_schedule_runs_on_the_further_of_steps_and_time():
    assert lr_factor(60, TR) == lr_factor(60, TR, time_fraction=0.2)  # steps further along: steps decide
    assert lr_factor(20, TR, time_fraction=0.5) == pytest.approx(lr_factor(55, TR))  # time decides: 0.5 of 110
    assert lr_factor(20, TR, time_fraction=0.5) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.45)))
    assert lr_factor(20, TR, time_fraction=1.0) == pytest.approx(0.01)
    assert lr_factor(3, TR) == pytest.approx(0.4) and lr_factor(3, TR, time_fraction=0.05) == pytest.approx(0.65)
    assert lr_factor(3, TR, time_fraction=0.5) == pytest.approx(lr_factor(55, TR))  # a budget shortens warmup too


def test_budget_fraction_moves_only_where_ranks_agree():
    b = TimeBudget(1.0)
    b.start()
    assert b.fraction == 0.0 and not b.spent
    b.agree(30.0)
    assert b.fraction == pytest.approx(0.5)
    b.agree(12.0)  # never backwards
    assert b.fraction == pytest.approx(0.5)
    b.resume_from(75.0)
    assert b.spent and b.fraction == 1.0 and b.local_seconds() >= 75.0
    assert TimeBudget(None).fraction == 0.0 and not TimeBudget(None).spent


def test_a_stage_that_spent_its_budget_is_done(tmp_path):
    from hpc_seg.training.stages import stage_done

    cfg = load_config(None, ["train.max_steps=100", "train.max_minutes=1"])
    (tmp_path / "final.json").write_text(json.dumps({"step": 40, "stopped_by": "max_minutes", "train_seconds": 61}))
    assert stage_done(tmp_path, cfg)
    assert not stage_done(tmp_path, load_config(None, ["train.max_steps=100", "train.max_minutes=2"]))
    assert not stage_done(tmp_path, load_config(None, ["train.max_steps=100"]))


def test_max_minutes_is_checked_at_load(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_minutes: 0\n")
    with pytest.raises(Exception, match="max_minutes"):
        load_config(cfg)


def test_time_budget_stops_two_ranks_and_resume_carries_the_clock(tmp_path, store):
    run = tmp_path / "run"
    sets = ["train.max_steps=100000", "train.max_minutes=0.05", "checkpoint.every_steps=0", "train.val_every_steps=0",
            "train.lr=0.01"]
    r = run_train(run, store, sets)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = json.loads((run / "final.json").read_text())
    assert final["stopped_by"] == "max_minutes" and 0 < final["step"] < 100000
    assert 3.0 <= final["train_seconds"] < 30.0
    lrs = [rec["lr"] for rec in records(run, "train")]
    assert max(lrs) > 0.005 and lrs[-1] < 0.004  # the cosine decayed over the budget, not over 100000 steps

    r = run_train(run, store, sets, resume="latest")  # the same budget: spent, as its checkpoint recorded
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((run / "final.json").read_text())["step"] == final["step"]

    more = (final["train_seconds"] + 5) / 60  # 5 s more than spent
    r = run_train(run, store, sets[:1] + [f"train.max_minutes={more}"] + sets[2:], resume="latest")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = json.loads((run / "final.json").read_text())
    assert records(run, "resume")[-1]["step"] == final["step"]
    assert again["step"] > final["step"] and more * 60 <= again["train_seconds"] < final["train_seconds"] + 30.0
