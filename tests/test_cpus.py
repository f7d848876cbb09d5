"""service/cpus.py: workers and threads follow the CPUs the process may use (affinity, cgroup quota),
not the host's core count: the service's workers and ONNX Runtime threads, training's torch threads
and the download stage's pool."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ServiceConfig
from service.cpus import cgroup_cpu_limit, usable_cpus

REPO = Path(__file__).resolve().parents[1]


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "150000 100000\n"}, 1.5),                                    # v2: docker --cpus 1.5
    ({"cpu.max": "max 100000\n"}, None),                                      # v2: no limit
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),     # v1: no limit
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_the_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, limit):
    assert cgroup_cpu_limit(cgroup(tmp_path, files)) == limit


def test_usable_cpus_is_the_smaller_of_affinity_and_the_quota_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(cgroup(tmp_path / "none", {})) == affinity
    assert usable_cpus(cgroup(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1
    assert usable_cpus(cgroup(tmp_path / "many", {"cpu.max": "6400000 100000"})) == affinity


def sized_under_one_cpu(code: str) -> str:
    """`code`'s output in a child process pinned to one CPU (as `taskset -c 0` or a cpuset would)."""
    pinned = f"import os; os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); {code}"
    return subprocess.run([sys.executable, "-c", pinned], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin the child to fewer")
def test_the_service_and_training_size_by_the_cpus_they_may_use():
    out = sized_under_one_cpu("from service.config import ServiceConfig; c = ServiceConfig.from_env({}); "
                              "print(c.cpu_count, c.workers, c.intra_op_threads)")
    assert out == "1 1 1", out
    out = sized_under_one_cpu("import torch; from pipeline.train import configure_threads, DistContext; "
                              "configure_threads(DistContext()); print(torch.get_num_threads())")
    assert out == "1", out
    assert ServiceConfig.from_env({}).workers == len(os.sched_getaffinity(0))  # unpinned, for contrast
