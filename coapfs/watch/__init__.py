"""Change detection beneath the served root: inotify where it can be trusted (`inotify`, the
only pyinotify importer), stat polling where it cannot (`poll`), chosen by file-system type
(`fstype`); `Watcher` combines them behind one interface."""

from .fstype import filesystem_type, inotify_sees_all_changes
from .signature import stat_signature
from .watcher import Watcher

__all__ = ["Watcher", "filesystem_type", "inotify_sees_all_changes", "stat_signature"]
