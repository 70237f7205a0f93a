"""What the benchmarks read from Linux's /proc: the CPU time and resident memory of a process
tree, the machine's busy time per CPU, and a process's file descriptors and TCP sockets."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc/PID/task/*/children``).

    Args:
        pid: The root process.
    """
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def _tree_files(pid: int, name: str) -> Iterator[str]:
    """The text of ``/proc/PID/{name}`` for ``pid`` and each descendant still alive."""
    for member in process_tree(pid):
        try:
            yield Path(f"/proc/{member}/{name}").read_text()
        except OSError:
            continue  # it exited since `process_tree` listed it


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in bytes (VmRSS from /proc).

    Args:
        pid: The root process.
    """
    total = 0
    for status in _tree_files(pid, "status"):
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


_HZ = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its living descendants, in seconds.

    Args:
        pid: The root process.
    """
    total = 0
    for stat in _tree_files(pid, "stat"):
        fields = stat.rpartition(")")[2].split()
        # utime, stime, and cutime, cstime: children that exited (and were waited for).
        total += sum(int(f) for f in fields[11:15])
    return total / _HZ


def machine_busy_s(cpus: set[int] | None = None) -> float:
    """CPU time all processes used since boot on some CPUs (None: all), in seconds.

    Args:
        cpus: The CPUs.
    """
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu"):
            break
        if (cpus is None and name == "cpu") or (cpus is not None and name[3:] in map(str, cpus)):
            values = [int(v) for v in fields[:8]]
            total += sum(values) - values[3] - values[4]  # less idle and iowait
    return total / _HZ


@dataclass
class CpuMeter:
    """CPU used during a stretch of time: by the server, by the fake and load generator, and
    by every other process on the CPUs that matter (other people's work on a shared machine).

    Args:
        server: The server's pid.
        helpers: The fake's and the load generator's pids.
        cpus: The CPUs our processes run on (None: all).
    """

    server: int
    helpers: tuple[int, ...]
    cpus: set[int] | None = None

    def read(self) -> tuple[float, float, float, float]:
        """(wall, busy, server, helpers) in seconds, to subtract two readings."""
        helpers = sum(tree_cpu_s(p) for p in set(self.helpers) - {self.server})
        busy = machine_busy_s(self.cpus)
        return time.monotonic(), busy, tree_cpu_s(self.server), helpers

    @staticmethod
    def shares(start: tuple, end: tuple) -> dict:
        """CPUs used on average between two readings (1.0: one CPU busy all the time).

        Args:
            start: A `read` before.
            end: A `read` after.
        """
        wall, busy, server, helpers = (b - a for a, b in zip(start, end, strict=True))
        wall = max(wall, 1e-9)
        return {
            "server_cpus": server / wall,
            "others_cpus": max(0.0, busy - server - helpers) / wall,
        }


def socket_inodes(pid: int) -> tuple[int, set[int]]:
    """The number of open file descriptors of ``pid``, and the inodes of its sockets.

    Args:
        pid: The process.
    """
    count, inodes = 0, set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        count += 1
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return count, inodes


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def tcp_table(pid: int) -> dict[int, tuple[int, int, str]]:
    """TCP sockets of ``pid``'s network namespace by inode: (local port, remote port, state).

    Args:
        pid: Any process in the namespace.
    """
    table = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            table[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                _TCP_STATES.get(state, state),
            )
    return table


def count_fds(pid: int, own_port: int, upstream_port: int) -> dict:
    """The router's descriptors by kind: sockets listening, to clients (on its port), to the
    fake (its upstream keep-alive pool), other sockets, and everything else.

    Args:
        pid: The router process.
        own_port: The router's listening port.
        upstream_port: The fake's port.
    """
    total, inodes = socket_inodes(pid)
    table = tcp_table(pid)
    kinds: Counter[str] = Counter()
    for inode in inodes:
        local, remote, state = table.get(inode, (0, 0, "?"))
        if state == "LISTEN":
            kinds["listening"] += 1
        elif local == own_port:
            kinds["clients"] += 1
        elif remote == upstream_port and state == "ESTABLISHED":
            kinds["upstream"] += 1
        elif remote == upstream_port:
            kinds[f"upstream_{state.lower()}"] += 1
        else:
            kinds["other_sockets"] += 1
    return {"fds": total, "non_socket_fds": total - len(inodes), **kinds}
