"""The native data plane's default thread count: the cores the process may use, quota included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from burrow.relay.native_plane import data_threads


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [
        ("max 100000\n", None),  # no quota
        ("150000 100000\n", 2),  # 1.5 cores: 2 threads, the half core used
        ("100000 100000\n", 1),
        ("50000 100000\n", 1),  # half a core: still one thread
        ("junk\n", None),
        (None, None),  # no cgroup v2 file
    ],
)
def test_threads_follow_affinity_and_a_cgroup_quota(tmp_path: Path, cpu_max: str | None, cap: int | None) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    cores = len(os.sched_getaffinity(0))
    assert data_threads(path) == (min(cores, cap) if cap is not None else cores)


def test_a_quota_above_the_cores_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cpu.max"
    path.write_text("6400000 100000\n")  # 64 cores' worth
    assert data_threads(path) == len(os.sched_getaffinity(0))
