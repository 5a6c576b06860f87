"""
This test process's memory, from /proc (Linux): RSS, and its peak since a
reset, to bound what an attack makes a server hold.
"""

from __future__ import annotations

import re


def memory_kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB$", status.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """
    Reset this process's VmHWM to its current RSS (Linux C{clear_refs}
    value 5), so that VmHWM afterwards is the peak of what follows.

    @return: whether the kernel allowed it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True
