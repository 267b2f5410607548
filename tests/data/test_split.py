import json

import pytest

from hpc_seg.cli import main
from hpc_seg.data.split import check_split, ensure_split, load_split, make_split
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
        load_split(p)


def test_unknown_case_fails():
    with pytest.raises(SplitError, match="not in the store"):
        check_split({"train": ["zz"], "val": [], "test": []}, {"a"})


def test_split_file_on_store(phantom_store, capsys):
    out = phantom_store.parent / "split-test.json"
    assert main(["split", str(phantom_store), "--seed", "4", "--out", str(out)]) == 0
    s = load_split(out)
    assert sum(len(v) for v in s.values()) == 6 and all(s.values())
    again = ensure_split(phantom_store, out, 0.2, 0.2, 4)
    assert again == s
