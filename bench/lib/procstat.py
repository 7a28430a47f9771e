"""What a tunnel process costs, read from /proc: CPU time and proportional memory.

A tunnel is the process the harness started plus its descendants (nginx runs a master
and a worker). CPU is utime + stime of /proc/PID/stat, which for a thread-group leader
covers all its threads, in clock ticks; memory is Pss from /proc/PID/smaps_rollup, which
shares each shared page among the processes that map it, so libraries are not counted
once per process.
"""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of the whole tree, in seconds (0 when there is no process)."""
    if not pid:
        return 0.0
    ticks = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3 of stat); utime and stime are fields 14 and 15.
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def pss_kib(pid: int | None) -> int:
    """Sum of Pss over the tree, in KiB (0 when there is no process)."""
    if not pid:
        return 0
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total
