import json

import pytest

from hpc_seg.cli import main
from hpc_seg.ingest.split import check_split, make_split, read_split, read_split_file
from hpc_seg.errors import SplitError


def stats(n_tumour, n_clean):
    cases = {f"t{i}": {"stats": {"label_counts": [100, 10, 5]}} for i in range(n_tumour)}
    cases.update({f"c{i}": {"stats": {"label_counts": [100, 10, 0]}} for i in range(n_clean)})
    return cases


def test_split_by_case_disjoint_seeded_stratified():
    s = stats(20, 10)
    a = make_split(s, 0.2, 0.2, seed=1)
    assert a == make_split(s, 0.2, 0.2, seed=1)
    assert a != make_split(s, 0.2, 0.2, seed=2)
    allc = a["train"] + a["val"] + a["test"]
    assert sorted(allc) == sorted(s) and len(set(allc)) == len(allc)
    for name in ("val", "test"):  # both tumour and clean cases in each held-out split
        assert any(c.startswith("t") for c in a[name]) and any(c.startswith("c") for c in a[name])
    check_split(a, set(s))


def test_leak_fails_loudly(tmp_path):
    bad = {"train": ["a", "b"], "val": ["b"], "test": ["c"]}
    with pytest.raises(SplitError, match="'b' is in both 'train' and 'val'"):
        check_split(bad)
    p = tmp_path / "split.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(SplitError, match=str(p)):
        read_split_file(p)


def test_unknown_case_fails():
    with pytest.raises(SplitError, match="not in the store"):
        check_split({"train": ["zz"], "val": [], "test": []}, {"a"})


def test_split_on_store_and_from_file(phantom_store, tmp_path, capsys):
    assert main(["split", str(phantom_store), "--seed", "4"]) == 0
    s = read_split(phantom_store, 4)
    assert sum(len(v) for v in s.values()) == 6 and all(s.values())
    assert "preprocessing plan" in capsys.readouterr().out
    mine = {"train": s["train"][:2], "val": s["val"], "test": s["test"]}
    f = tmp_path / "fold.json"
    f.write_text(json.dumps(mine))
    assert main(["split", str(phantom_store), "--seed", "104", "--from", str(f)]) == 0
    assert read_split(phantom_store, 104) == mine
    f.write_text(json.dumps({"train": ["lits_0000"], "val": ["lits_0000"], "test": []}))
    assert main(["split", str(phantom_store), "--seed", "105", "--from", str(f)]) == 2
    assert "leakage" in capsys.readouterr().err
