"""The CPUs this process may use: the one count the service's workers and threads, training's
threads and the download stage's pool are sized by (standard library only).

``os.cpu_count()`` is the host's core count. In a container or under ``taskset`` the process may run
on fewer: its CPU affinity (``os.sched_getaffinity``) and its cgroup's CPU quota (a Docker
``--cpus 1.5`` or a Kubernetes CPU limit: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``). Sizing by the host count there starts more workers and threads than there is
CPU time for, and they contend.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "usable_cpus"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """min(affinity, the cgroup quota rounded up), at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(affinity, math.ceil(limit)) if limit else affinity)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use per period (1.5 for ``--cpus 1.5``); None when unlimited
    or unreadable (cgroup v2 ``cpu.max`` is ``"max 100000"`` or ``"150000 100000"``; v1 quota -1 = none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else _ratio(quota, period)
    except (OSError, ValueError):
        pass
    try:
        return _ratio((root / "cpu" / "cpu.cfs_quota_us").read_text(), (root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None
