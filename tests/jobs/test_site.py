"""Where the site profile comes from: --site, $HPC_SEG_SITE, ~/.config/hpc-seg/site.yaml, shipped."""

import pytest

from hpc_seg.errors import ConfigError
from hpc_seg.jobs.submit import SHIPPED_SITE, find_site, load_launch_config


def test_site_profile_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HPC_SEG_SITE", raising=False)
    assert find_site(None) == SHIPPED_SITE and SHIPPED_SITE.is_file()
    user = tmp_path / ".config" / "hpc-seg" / "site.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("slurm:\n  partition: user-gpu\n")
    assert find_site(None) == user
    env_site = tmp_path / "env.yaml"
    env_site.write_text("slurm:\n  partition: env-gpu\n")
    monkeypatch.setenv("HPC_SEG_SITE", str(env_site))
    assert find_site(None) == env_site
    flag = tmp_path / "flag.yaml"
    flag.write_text("slurm:\n  partition: flag-gpu\n")
    assert find_site(flag) == flag
    assert load_launch_config("tiny_cpu.yaml", [], None).slurm.partition == "env-gpu"
    assert load_launch_config("tiny_cpu.yaml", [], flag).slurm.partition == "flag-gpu"
    monkeypatch.setenv("HPC_SEG_SITE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml: site profile not found"):
        find_site(None)
