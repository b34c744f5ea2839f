"""minillm.hostmem: the host memory a session may take, a container's cgroup limit included,
read from fake /proc and /sys/fs/cgroup trees (cgroup v2 and v1)."""

from __future__ import annotations

import pytest
from helpers import BACKEND

from minillm import hostmem
from minillm.errors import MiniLLMError

GB = 10 ** 9


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_cgroup(directory, limit, usage, inactive):
    write(directory / "memory.max", f"{limit}\n")
    write(directory / "memory.current", f"{usage}\n")
    write(directory / "memory.stat", f"anon {usage - inactive}\ninactive_file {inactive}\n"
                                     f"active_file 0\n")


def v1_cgroup(directory, limit, usage, inactive):
    write(directory / "memory.limit_in_bytes", f"{limit}\n")
    write(directory / "memory.usage_in_bytes", f"{usage}\n")
    write(directory / "memory.stat", f"cache {inactive}\ninactive_file {inactive}\n"
                                     f"total_inactive_file {inactive}\n")


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A fake host: 16 GB MemAvailable, and the process in cgroup /app (v2) by default."""
    write(tmp_path / "meminfo", "MemTotal: 33554432 kB\nMemAvailable: 15625000 kB\n")
    write(tmp_path / "self_cgroup", "0::/app\n")
    monkeypatch.setattr(hostmem, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(hostmem, "SELF_CGROUP", str(tmp_path / "self_cgroup"))
    monkeypatch.setattr(hostmem, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    return tmp_path


def test_no_cgroup_limit_leaves_memavailable(tree):
    write(tree / "cgroup" / "app" / "memory.max", "max\n")
    assert hostmem.available_bytes() == 16 * GB


def test_a_v2_limit_counts_usage_less_inactive_file_cache(tree):
    v2_cgroup(tree / "cgroup" / "app", limit=2 * GB, usage=int(1.5 * GB), inactive=GB // 2)
    assert hostmem.available_bytes() == GB  # 2 GB - (1.5 GB - 0.5 GB reclaimable)


def test_a_tighter_parent_limit_wins(tree):
    write(tree / "self_cgroup", "0::/user.slice/app\n")
    v2_cgroup(tree / "cgroup" / "user.slice" / "app", limit=4 * GB, usage=GB, inactive=0)
    v2_cgroup(tree / "cgroup" / "user.slice", limit=2 * GB, usage=int(1.7 * GB), inactive=0)
    assert hostmem.available_bytes() == int(0.3 * GB)


def test_memavailable_wins_when_smaller(tree):
    v2_cgroup(tree / "cgroup" / "app", limit=64 * GB, usage=GB, inactive=0)
    assert hostmem.available_bytes() == 16 * GB


def test_inside_a_container_the_mount_is_the_cgroup(tree):
    """A namespaced container sees its own cgroup at the mount; /proc/self/cgroup may name a
    path that does not exist below it."""
    write(tree / "self_cgroup", "0::/\n")
    v2_cgroup(tree / "cgroup", limit=3 * GB, usage=GB, inactive=0)
    assert hostmem.available_bytes() == 2 * GB
    write(tree / "self_cgroup", "0::/docker/0123abcd\n")
    assert hostmem.available_bytes() == 2 * GB


def test_cgroup_v1_memory_controller(tree):
    write(tree / "self_cgroup", "12:pids:/docker/x\n4:memory:/docker/x\n1:cpu,cpuacct:/\n")
    v1_cgroup(tree / "cgroup" / "memory" / "docker" / "x", limit=2 * GB, usage=GB, inactive=0)
    v1_cgroup(tree / "cgroup" / "memory", limit=9223372036854771712, usage=20 * GB,
              inactive=0)  # v1's "no limit" at the root
    assert hostmem.available_bytes() == GB


def test_a_hybrid_host_reads_the_v1_memory_controller(tree):
    """systemd's hybrid layout lists v2's unified line too (first, here); its memory limit is
    the v1 controller's."""
    write(tree / "self_cgroup", "0::/app\n4:memory:/app\n")
    v1_cgroup(tree / "cgroup" / "memory" / "app", limit=3 * GB, usage=GB, inactive=0)
    assert hostmem.available_bytes() == 2 * GB


def test_a_v1_ancestors_limit_from_hierarchical_memory_limit(tree):
    """A v1 container without its own cgroup namespace sees only its cgroup: its parent's
    limit comes in memory.stat."""
    write(tree / "self_cgroup", "4:memory:/pod/x\n")
    x = tree / "cgroup" / "memory" / "pod" / "x"
    v1_cgroup(x, limit=9223372036854771712, usage=GB, inactive=0)
    with open(x / "memory.stat", "a") as f:
        f.write(f"hierarchical_memory_limit {3 * GB}\n")
    assert hostmem.available_bytes() == 2 * GB


def test_a_path_outside_the_namespace_reads_the_mount(tree):
    """/proc/self/cgroup names ".." when the process's cgroup lies outside its namespace's
    root: the walk stays within the mount (and ends)."""
    write(tree / "self_cgroup", "0::/../..\n")
    v2_cgroup(tree / "cgroup", limit=3 * GB, usage=GB, inactive=0)
    assert hostmem.available_bytes() == 2 * GB


def test_usage_over_the_limit_leaves_no_room(tree):
    v2_cgroup(tree / "cgroup" / "app", limit=GB, usage=2 * GB, inactive=0)
    assert hostmem.available_bytes() == 0


@pytest.mark.parametrize("broken", ["missing", "garbage", "not utf-8"])
def test_unreadable_files_mean_unknown_not_a_crash(tree, broken):
    if broken == "garbage":
        write(tree / "meminfo", "MemAvailable: lots\n")
        v2_cgroup(tree / "cgroup" / "app", limit=GB, usage=0, inactive=0)
        write(tree / "cgroup" / "app" / "memory.max", "a lot\n")
        write(tree / "cgroup" / "app" / "memory.stat", "inactive_file many\n")
    elif broken == "not utf-8":
        (tree / "meminfo").unlink()
        (tree / "self_cgroup").write_bytes(b"0::/\xff\xfe\n")
    else:
        (tree / "meminfo").unlink()
        (tree / "self_cgroup").unlink()
    assert hostmem.available_bytes() is None


def test_a_garbled_stat_still_reads_the_limit(tree):
    v2_cgroup(tree / "cgroup" / "app", limit=2 * GB, usage=GB, inactive=0)
    write(tree / "cgroup" / "app" / "memory.stat", "inactive_file many\nanon\n")
    assert hostmem.available_bytes() == GB


@pytest.mark.skipif(BACKEND != "numpy", reason="a CuPy session's check reads the GPU's memory")
def test_a_session_over_the_containers_limit_is_refused(tree, tiny_model):
    """The check a session makes before it allocates (minillm.cache.check_memory) sees the
    cgroup's limit, not the host's 16 GB: one clear error instead of the kernel's OOM kill."""
    v2_cgroup(tree / "cgroup" / "app", limit=GB, usage=int(0.9 * GB), inactive=0)
    tiny_model.session(n_local=64).close()  # small: fits the 0.1 GB left
    with pytest.raises(MiniLLMError, match=r"only 0\.10 GB is available"):
        tiny_model.session(n_local=10 ** 7)  # 5.2 GB of cache for the tiny model
