"""Which file systems inotify can be trusted on: statfs(2) names the type, and a type whose
changes may be made by other machines (network and cluster file systems, FUSE) is not."""

from __future__ import annotations

from pathlib import Path

from ..syscalls import statfs_type

# statfs(2) f_type of filesystems whose changes made elsewhere never reach this kernel's inotify.
_REMOTE_MAGIC = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x00C36400: "ceph",
    0x01021997: "9p",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x73757245: "coda",
    0x564C: "ncp",
    0x0BD00BD0: "lustre",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x47504653: "gpfs",
}
_LOCAL_MAGIC = {
    0xEF53: "ext4",
    0x01021994: "tmpfs",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlay",
    0xF2F52010: "f2fs",
    0x2FC12FC1: "zfs",
    0x4D44: "vfat",
    0x5346544E: "ntfs",
    0x2011BAB0: "exfat",
    0x73717368: "squashfs",
    0x9660: "iso9660",
    0x858458F6: "ramfs",
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x1373: "devtmpfs",
}


def filesystem_type(path: Path) -> str:
    """Name of the filesystem type holding path, e.g. "ext4", "tmpfs", "nfs", or "0x1234"."""
    return inotify_sees_all_changes(path)[1]


def inotify_sees_all_changes(path: Path) -> tuple[bool, str]:
    """Whether inotify on path's filesystem reports every change, and that filesystem's type."""
    magic = statfs_type(path)
    if magic in _REMOTE_MAGIC:
        return False, _REMOTE_MAGIC[magic]
    return True, _LOCAL_MAGIC.get(magic, f"{magic:#x}")
