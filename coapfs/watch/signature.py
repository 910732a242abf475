"""What identifies the state of a file or directory: the parts of its stat that change whenever
its content may have. Change detection by polling compares them, and ETags are derived from them.

The device number is left out: two mounts of one distributed file system (GlusterFS replicas, for
instance) report different devices for the same file, and a client must see the same ETag from
either. The inode, size and both timestamps identify a state on their own.
"""

from __future__ import annotations

import os

Signature = tuple[int, int, int, int]


def stat_signature(st: os.stat_result) -> Signature:
    """(inode, size, mtime ns, ctime ns); atime and the device excluded."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
