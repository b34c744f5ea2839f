"""How much memory this process may still take on the host (Linux; None elsewhere).

The machine's MemAvailable is not the answer inside a container: a Docker `--memory` or a
systemd MemoryMax limit is a cgroup's, and a process that outgrows it is killed without a
word. So the answer is the smaller of MemAvailable and, for the process's cgroup and each
cgroup above it that has a limit, the limit minus the memory charged to it that cannot be
given back (its usage less its inactive file cache, as container runtimes count a working
set). Both cgroup versions are read: v2's unified tree and v1's memory controller.
"""

from __future__ import annotations

import os

MEMINFO = "/proc/meminfo"
SELF_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
# v2 file names, then v1's: (limit, usage, the memory.stat key of inactive file pages)
V2 = ("memory.max", "memory.current", "inactive_file")
V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
NO_LIMIT = 1 << 60  # v1 writes "no limit" as a number near 2**63


def available_bytes() -> int | None:
    """min(MemAvailable, every enclosing cgroup's headroom); None where neither is known."""
    known = [b for b in (mem_available(MEMINFO), cgroup_headroom(SELF_CGROUP, CGROUP_ROOT))
             if b is not None]
    return min(known) if known else None


def mem_available(path: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_headroom(self_cgroup: str, root: str) -> int | None:
    """The least headroom over the process's memory cgroup and its ancestors that have a
    limit; None when no limit is found (or nothing can be read)."""
    try:
        with open(self_cgroup) as f:
            lines = f.read().splitlines()
    except (OSError, ValueError):  # (a cgroup name that is not UTF-8)
        return None
    fields = [(line.split(":", 2) + ["", ""])[:3] for line in lines]
    for _, controllers, path in fields:  # v1's memory controller (hybrid hosts have both)
        if "memory" in controllers.split(","):
            return _headroom(os.path.join(root, "memory"), path, V1)
    for hierarchy, controllers, path in fields:
        if hierarchy == "0" and controllers == "":
            return _headroom(root, path, V2)
    return None


def _headroom(mount: str, path: str, names: tuple[str, str, str]) -> int | None:
    """The least room from the cgroup's directory up to the mount. Inside a container the
    mount is often the cgroup itself (its path, from outside, does not exist below it): then
    only the mount is read."""
    mount = os.path.normpath(mount)
    here = os.path.normpath(os.path.join(mount, path.strip("/")))
    if os.path.commonpath([here, mount]) != mount or not os.path.isdir(here):
        here = mount  # (a path with "..", from outside the process's cgroup namespace)
    rooms = [_room(here, names)]
    while here != mount:
        here = os.path.dirname(here)
        rooms.append(_room(here, names))
    known = [r for r in rooms if r is not None]
    return min(known) if known else None


def _room(directory: str, names: tuple[str, str, str]) -> int | None:
    """The cgroup's limit less its working set; None without a limit. v1's memory.stat also
    gives the least limit of its ancestors (hierarchical_memory_limit), which a container
    without its own cgroup namespace cannot read from their directories."""
    limit_file, usage_file, inactive_key = names
    stat = _read_stat(os.path.join(directory, "memory.stat"))
    limits = [_read_int(os.path.join(directory, limit_file)),
              stat.get("hierarchical_memory_limit")]
    limits = [n for n in limits if n is not None and n < NO_LIMIT]
    if not limits:
        return None
    usage = _read_int(os.path.join(directory, usage_file)) or 0
    return max(0, min(limits) - max(0, usage - stat.get(inactive_key, 0)))


def _read_stat(path: str) -> dict[str, int]:
    stat = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    stat[key] = int(value)
    except (OSError, ValueError):
        pass
    return stat


def _read_int(path: str) -> int | None:
    """The number in a cgroup file; None for a missing file or "max" (no limit)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except (OSError, ValueError):
        return None
    try:
        return int(text)
    except ValueError:
        return None
