"""The file service's protocol behaviour (aiocoap's "resource" half; the program around it owns
sockets, configuration and lifecycle).

Every request flows one way: Uri-Path parsed and checked (`resolve.parse_uri_path`, `access`) →
resolved beneath the root (`resolve.Root`) → the cache or the file system → a response. Every
OS error on that way is answered by `errors`: the client's 4.xx, or 5.03 for what only the
server can mend (disk full, I/O error), never a 5.00.

The resource also keeps its cache fresh: it holds watches (`watchset`) on the directories of
what it caches or what is observed, and the watcher's change reports drop cache entries and
notify observers (`observe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.error
from aiocoap.interfaces import ObservableResource
from aiocoap.numbers import ContentFormat, OptionNumber, codes
from aiocoap.optiontypes import BlockOption
from aiocoap.resource import Resource

from . import access, errors, listing
from .cache import SMALL_FILE_BYTES, Cache, Entry
from .contentformat import guess_content_format
from .etag import etag_from_digest, etag_from_stat, stat_signature
from .observe import Observations
from .pathindex import Key
from .resolve import Root, Target, parse_uri_path
from .upload import Uploads, space_left
from .watch import Watcher
from .watchset import WatchSet, directories_of

log = logging.getLogger("coapfs")

#: The link by which clients (and resource directories) find the file service.
SERVICE_LINK = '</>;ct=40;rt="tag:chrysn@fsfe.org,2022:fileserver"'
_WELL_KNOWN_CORE = (".well-known", "core")
_DEFAULT_SZX = 6  # 1024-byte blocks unless the client asks for smaller ones

#: The critical options (RFC 7252 5.4.1) this service acts on (Uri-Host, Uri-Port and Uri-Query
#: by serving the one tree whatever they say); any other critical option is a 4.02.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        OptionNumber.IF_MATCH,
        OptionNumber.URI_HOST,
        OptionNumber.IF_NONE_MATCH,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_QUERY,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK2,
        OptionNumber.BLOCK1,
    }
)
_PROXY_OPTIONS = frozenset({OptionNumber.PROXY_URI, OptionNumber.PROXY_SCHEME})


@dataclass
class Counters:
    """Totals for the supervisor's status line."""

    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0


@dataclass(frozen=True)
class Freshness:
    """How the server learns of changes on disk ([cache] and [observe] in the configuration)."""

    byte_budget: int = 64 * 1024 * 1024
    watch_budget: int = 1024
    mode: str = "auto"
    poll_interval: float = 2.0
    coalesce: float = 0.1


class FileServer(Resource, ObservableResource):
    """Serves the directory tree below `root`: listings, files, and (if `write`) PUT and DELETE.

    Listings and file state are cached while inotify watches their directories; the same
    change reports drive Observe. Watching starts with `start()` or the first request (it needs
    the event loop)."""

    def __init__(
        self,
        root: Path,
        *,
        write: bool = False,
        etag_length: int = 8,
        show_hidden: bool = False,
    ) -> None:
        super().__init__()
        self._root_path = _normalized(root)
        self._root = Root(self._root_path)
        self._write = write
        self._etag_length = etag_length
        self._show_hidden = show_hidden
        self._freshness = Freshness()
        self._watches: WatchSet | None = None
        self._cache: Cache | None = None
        self._observations = Observations(self._freshness.coalesce)
        self._observers: dict[Any, tuple[Key, list[Key]]] = {}
        self._uploads = Uploads()
        self.counters = Counters()

    @property
    def root(self) -> Path:
        return self._root_path

    @property
    def write(self) -> bool:
        return self._write

    @property
    def etag_length(self) -> int:
        return self._etag_length

    @property
    def cache_mode(self) -> str:
        """How changes are detected now: "inotify" or "poll" (before watching starts, the
        configured mode, which may be "auto")."""
        return self._watches.watcher.mode if self._watches else self._freshness.mode

    def reconfigure(self, *, root: Path, write: bool, etag_length: int) -> None:
        """Apply a live change; a bad new root raises OSError and leaves everything as it was."""
        if _normalized(root) != self._root_path:
            self._switch_root(Root(_normalized(root)), _normalized(root))
        self._write = write
        self._etag_length = etag_length

    def _switch_root(self, new_root: Root, path: Path) -> None:
        was_watching = self._stop_watching()
        old, self._root, self._root_path = self._root, new_root, path
        old.close()
        if was_watching:
            self.start()

    def _follow_root(self) -> None:
        """The root's path may now name another directory (`mv srv srv.old; mv srv.new srv`):
        serve what the path names, as a client of that path expects, and start over."""
        try:
            st = os.stat(self._root_path)
            if (st.st_dev, st.st_ino) == self._root.identity():
                return
            new_root = Root(self._root_path)
        except OSError:
            return  # mid-swap: the path is polled, and its return is reported again
        log.warning("%s now names another directory; serving that one", self._root_path)
        self._switch_root(new_root, self._root_path)

    def tune(self, *, cache: Any, observe: Any) -> None:
        """Apply [cache] and [observe]; watching restarts if how changes are detected changed."""
        new = Freshness(
            byte_budget=cache.byte_budget,
            watch_budget=cache.watch_budget,
            mode=cache.mode,
            poll_interval=cache.poll_interval,
            coalesce=observe.coalesce_ms / 1000,
        )
        old, self._freshness = self._freshness, new
        self._observations.coalesce = new.coalesce
        if self._cache is not None:
            self._cache.resize(new.byte_budget)
        if (old.watch_budget, old.mode, old.poll_interval) != (
            new.watch_budget,
            new.mode,
            new.poll_interval,
        ) and self._stop_watching():
            self.start()

    def close(self) -> None:
        self._stop_watching()
        self._observations.close()
        self._root.close()

    def _watching(self) -> tuple[WatchSet, Cache]:
        """The watch set and cache, started on first use (inside the event loop)."""
        if self._watches is None or self._cache is None:
            f = self._freshness
            watcher = Watcher(
                self._root_path,
                self._on_change,
                self._on_reset,
                mode=f.mode,
                watch_budget=f.watch_budget,
                poll_interval=f.poll_interval,
            )
            watcher.start()
            self._watches = WatchSet(self._root, self._root_path, watcher)
            self._cache = Cache(f.byte_budget, self._entry_dropped)
            for _key, dirs in self._observers.values():
                self._watches.hold(dirs)
        return self._watches, self._cache

    def start(self) -> None:
        """Start watching now, on the event loop (logging how changes are detected), rather
        than with the first request; every observation is rendered afresh."""
        if self._watches is None:
            self._watching()
            self._observations.changed((), subtree=True)

    def _stop_watching(self) -> bool:
        """Forget everything cached and every watch (a new root, or a new way of watching);
        whether anything was being watched. Closing the watcher ends its watches at once."""
        watches, self._watches, self._cache = self._watches, None, None
        if watches is None:
            return False
        watches.watcher.close()
        return True

    def _entry_dropped(self, key: Key, entry: Entry) -> None:
        if self._watches is not None:
            self._watches.release(directories_of(key, is_dir=entry.is_dir))

    def _key_of(self, path: Path) -> Key | None:
        try:
            return path.relative_to(self._root_path).parts
        except ValueError:
            return None

    def _on_change(self, path: Path) -> None:
        self._stale(path, reset=False)

    def _on_reset(self, path: Path) -> None:
        self._stale(path, reset=True)

    def _stale(self, path: Path, *, reset: bool) -> None:
        """What is cached for `path` is stale (with `reset`: everything at or beneath it, since
        changes may have gone unseen); drop it and tell its observers."""
        key = self._key_of(path)
        if key is None or self._watches is None:
            return
        if key == ():
            self._follow_root()
        if self._watches is None or self._cache is None:
            return
        if reset:
            self._watches.rewatch(key)  # what went unseen may include a directory replaced
            subtree = True
        else:
            subtree = self._watches.replaced(key)
        self._cache.drop(key, subtree=subtree)
        self._observations.changed(key, subtree=subtree)

    def _changed_here(self, key: Key) -> None:
        """Our own write: drop what was cached and notify observers at once, before inotify
        reports it."""
        for k in (key, key[:-1]):
            if self._cache is not None:
                self._cache.drop(k)
            self._observations.changed(k)

    def get_resources_as_linkheader(self) -> str:
        """One link for the whole service; individual files are never registered."""
        return SERVICE_LINK

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        # GETs pick out the requested block themselves (reading only that block, and answering
        # any block cold); uploads are assembled by `Uploads`, which (unlike aiocoap's spool)
        # answers every block that does not fit with a 4.xx.
        return False

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        self.counters.requests += 1
        try:
            _check_options(request)
            response = await super().render(request)
        except OSError as e:
            raise self._counted(errors.from_oserror(e)) from None
        except aiocoap.error.ConstructionRenderableError as e:
            raise self._counted(e) from None
        except Exception:
            self.counters.server_errors += 1
            raise
        return response

    def _counted(
        self, e: aiocoap.error.ConstructionRenderableError
    ) -> aiocoap.error.ConstructionRenderableError:
        if e.code.class_ == 5 and not isinstance(e, errors.NotAProxy):
            self.counters.server_errors += 1
        else:
            self.counters.client_errors += 1
        return e

    # Observe

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        """Accept every observation of a GET of a valid path; the first rendering answers errors
        (and an unsuccessful notification ends the observation, e.g. 4.04 after deletion).

        Anything else is answered once, without Observe: aiocoap needs every observation
        accepted (it calls the cancellation callback regardless), and a PUT or DELETE must never
        be rendered again as a notification (that would repeat the write on every change)."""
        target = self._observable_target(request)
        if target is None:
            serverobservation.accept(lambda: None)
            serverobservation.deregister()
            return
        watches, _cache = self._watching()
        dirs = directories_of(target.segments, is_dir=target.is_dir_request)
        watches.hold(dirs)
        self._observations.add(target.segments, serverobservation)
        self._observers[serverobservation] = (target.segments, dirs)
        serverobservation.accept(lambda: self._observation_ended(serverobservation))

    def _observable_target(self, request: aiocoap.Message) -> Target | None:
        if request.code != codes.GET or request.opt.uri_path == _WELL_KNOWN_CORE:
            return None
        try:
            _check_options(request)
            return self._target(request)
        except aiocoap.error.RenderableError:
            return None

    def _observation_ended(self, serverobservation: Any) -> None:
        key, dirs = self._observers.pop(serverobservation)
        self._observations.remove(key, serverobservation)
        if self._watches is not None:
            self._watches.release(dirs)

    # GET

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.uri_path == _WELL_KNOWN_CORE:
            _check_accept(request, ContentFormat.LINKFORMAT)
            return aiocoap.Message(
                payload=SERVICE_LINK.encode("ascii"), content_format=ContentFormat.LINKFORMAT
            )
        target = self._target(request)
        entry, fd = self._lookup(target)
        try:
            if entry.is_dir:
                content_format = ContentFormat.LINKFORMAT
            else:
                content_format = guess_content_format(target.segments[-1])
            _check_accept(request, content_format)
            etag = etag_from_digest(entry.digest, self._etag_length)
            _check_conditions(request, etag, exists=True)
            if etag is not None and etag in request.opt.etags:
                return aiocoap.Message(code=codes.VALID, etag=etag)
            body = entry.body
            if body is not None:
                response = _block_response(
                    request, len(body), lambda offset, size: body[offset : offset + size]
                )
            else:
                if fd is None:
                    fd, st = self._root.open_for_reading(target.segments)
                    if stat_signature(st) != stat_signature(entry.st):
                        entry = Entry(False, st, None)
                        etag = etag_from_digest(entry.digest, self._etag_length)
                readable = fd
                response = _block_response(
                    request, entry.st.st_size, lambda offset, size: os.pread(readable, size, offset)
                )
            if content_format is not None:
                response.opt.content_format = content_format
            response.opt.etag = etag
            return response
        finally:
            if fd is not None:
                os.close(fd)

    def _lookup(self, target: Target) -> tuple[Entry, int | None]:
        """The entry for `target` from the cache, or read from disk (and cached where inotify
        vouches for it); with a descriptor still open when a large file must be read from."""
        key = target.segments
        watches, cache = self._watching()
        if watches.watcher.mode == "poll":
            entry, fd, _watchable = self._read(target)
            return entry, fd
        hit = cache.get(key)
        if hit is not None and hit.is_dir == target.is_dir_request:
            return hit, None
        dirs = directories_of(key, is_dir=target.is_dir_request)
        trusted = watches.hold(dirs)  # before reading, so no change can slip in between
        try:
            entry, fd, watchable = self._read(target)
        except BaseException:
            watches.release(dirs)
            raise
        cacheable = trusted and watchable and (entry.is_dir or not self._root.names_a_link(key))
        if not (cacheable and cache.put(key, entry)):
            watches.release(dirs)
        return entry, fd

    def _read(self, target: Target) -> tuple[Entry, int | None, bool]:
        """The entry from disk, a descriptor if a large file must still be read from, and
        whether watching the path's directories can see every change to what was read: not for
        a file with other hard links (changed under another name), nor for a listing showing
        links (their targets change elsewhere); `_lookup` rules out files reached through a
        link (checked only where the entry would be cached)."""
        fd, st = self._root.open_for_reading(target.segments)
        keep_open = False
        try:
            if stat.S_ISDIR(st.st_mode):
                if not target.is_dir_request:
                    raise errors.NotAFile()
                body, shows_links = self._listing(fd, target)
                return Entry(True, st, body), None, not shows_links
            if target.is_dir_request:
                raise errors.NotADirectory()
            watchable = st.st_nlink == 1
            if st.st_size <= SMALL_FILE_BYTES:
                body = _read_whole(fd, st.st_size)
                if stat_signature(os.fstat(fd)) == stat_signature(st):
                    return Entry(False, st, body), None, watchable
                st = os.fstat(fd)  # written to meanwhile: serve it block by block instead
            keep_open = True
            return Entry(False, st, None), fd, watchable
        finally:
            if not keep_open:
                os.close(fd)

    def _listing(self, dirfd: int, target: Target) -> tuple[bytes, bool]:
        """The link-format body, and whether it shows any symbolic link."""
        links = []

        def resolve_link(name: str) -> os.stat_result | None:
            links.append(name)
            try:
                return self._root.stat((*target.segments, name))
            except OSError:
                return None

        entries = listing.read_entries(dirfd, resolve_link, show_hidden=self._show_hidden)
        return listing.render_listing(target.segments, entries), bool(links)

    # PUT and DELETE

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        access.check_writable(self._write)
        self._target(request)  # a bad path is refused at its first block, before any spooling
        payload = self._uploads.feed(request, space=space_left(self._root.fd))
        if payload is None:
            return aiocoap.Message(code=codes.CONTINUE, block1=request.opt.block1)
        target, parent, existing = self._write_target(
            request, "PUT needs a file name (directories are not created over CoAP)"
        )
        try:
            st = await asyncio.to_thread(
                _replace_atomically,
                parent,
                target.segments[-1],
                payload,
                existing,
                no_replace=bool(request.opt.if_none_match),
            )
        finally:
            os.close(parent)
        self._changed_here(target.segments)
        code = codes.CREATED if existing is None else codes.CHANGED
        response = aiocoap.Message(code=code, etag=etag_from_stat(st, self._etag_length))
        response.opt.block1 = request.opt.block1
        return response

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        target, parent, existing = self._write_target(
            request, "Directories are not deleted over CoAP"
        )
        try:
            if existing is None:
                raise errors.NotFound()
            os.unlink(target.segments[-1], dir_fd=parent)
        finally:
            os.close(parent)
        self._changed_here(target.segments)
        return aiocoap.Message(code=codes.DELETED)

    def _write_target(
        self, request: aiocoap.Message, directory_refusal: str
    ) -> tuple[Target, int, os.stat_result | None]:
        """For PUT and DELETE: the file named, its parent directory (open), and the regular file
        there now (None if there is none), with If-Match and If-None-Match checked against it."""
        access.check_writable(self._write)
        target = self._target(request)
        if target.is_dir_request:
            raise errors.BadPath(directory_refusal)
        parent = self._open_parent(target)
        try:
            existing = self._existing(parent, target, directory_refusal)
            etag = None if existing is None else etag_from_stat(existing, self._etag_length)
            _check_conditions(request, etag, exists=existing is not None)
        except BaseException:
            os.close(parent)
            raise
        return target, parent, existing

    def _open_parent(self, target: Target) -> int:
        try:
            return self._root.open_parent(target.segments)
        except (FileNotFoundError, NotADirectoryError):
            raise errors.NotFound("Parent directory does not exist") from None

    def _existing(
        self, parent: int, target: Target, directory_refusal: str
    ) -> os.stat_result | None:
        """The regular file a write would replace (None if there is none); directories and
        symbolic links are refused, so a write never reaches past the name it was sent to."""
        try:
            lst = os.stat(target.segments[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(lst.st_mode):
            raise errors.NotAFile(f"Is a directory: {directory_refusal}")
        if not stat.S_ISREG(lst.st_mode):
            raise errors.Forbidden("Only regular files can be written or deleted")
        return lst

    def _target(self, request: aiocoap.Message) -> Target:
        target = parse_uri_path(request.opt.uri_path)
        access.check_visible(target.segments, show_hidden=self._show_hidden)
        return target


def _check_options(request: aiocoap.Message) -> None:
    """Refuse what this server cannot honour: proxying (5.05, RFC 7252 5.7.2) and any critical
    option it does not act on (4.02), rather than serving something the client did not ask for."""
    for option in request.opt.option_list():
        number = option.number
        if number in _PROXY_OPTIONS:
            raise errors.NotAProxy()
        if number.is_critical() and number not in _UNDERSTOOD_CRITICAL:
            raise errors.UnsupportedOption(f"Unsupported critical option {int(number)}")


def _check_accept(request: aiocoap.Message, content_format: ContentFormat | None) -> None:
    """4.06 unless Accept names what would be sent (octet-stream where no format is known)."""
    accept = request.opt.accept
    if accept is not None and accept != (content_format or ContentFormat.OCTETSTREAM):
        raise errors.NotAcceptable()


def _check_conditions(request: aiocoap.Message, etag: bytes | None, *, exists: bool) -> None:
    """If-Match (an empty one: "exists") and If-None-Match (RFC 7252 5.10.8), for any method."""
    wanted = request.opt.if_match
    if wanted:
        if not exists:
            raise errors.PreconditionFailed("The file does not exist (If-Match)")
        if b"" not in wanted and etag is None:
            raise errors.PreconditionFailed(
                "No ETag to match: ETags are disabled here (an empty If-Match means 'exists')"
            )
        if b"" not in wanted and etag not in wanted:
            raise errors.PreconditionFailed("The file has changed (If-Match)")
    if exists and request.opt.if_none_match:
        raise errors.PreconditionFailed("The file exists (If-None-Match)")


def _block_response(request: aiocoap.Message, total: int, read) -> aiocoap.Message:
    """The requested Block2 of a body of `total` bytes, reading only that block."""
    requested = request.opt.block2
    if requested is None:
        requested = BlockOption.BlockwiseTuple(0, False, _DEFAULT_SZX)
    offset, size = requested.start, requested.size
    if offset > 0 and offset >= total:
        raise errors.BlockOutOfRange()
    payload = read(offset, size) if total else b""
    more = offset + len(payload) < total
    response = aiocoap.Message(payload=payload)
    if more or requested.block_number > 0 or request.opt.block2 is not None:
        response.opt.block2 = BlockOption.BlockwiseTuple(
            requested.block_number, more, min(requested.size_exponent, _DEFAULT_SZX)
        )
        response.opt.size2 = total
    elif request.opt.size2 is not None:
        response.opt.size2 = total
    return response


def _normalized(root: Path | str) -> Path:
    """The root as the watcher reports paths beneath it: absolute, without `..` or `.`."""
    return Path(os.path.abspath(root))


def _read_whole(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _replace_atomically(
    parent: int, name: str, data: bytes, existing: os.stat_result | None, *, no_replace: bool
) -> os.stat_result:
    """Write `data` to a hidden spool file beside `name`, then move it into place in one step.

    Readers see either the old or the new content, never a mix. With `no_replace` the move is a
    hard link, which fails instead of replacing a file created meanwhile. Runs in a worker thread
    (the writes and fsync can be slow)."""
    spool = f"{access.TEMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(
        spool,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o666,
        dir_fd=parent,
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if existing is not None:
            os.fchmod(fd, stat.S_IMODE(existing.st_mode))
        os.fsync(fd)
        if no_replace:
            try:
                os.link(spool, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
            except FileExistsError:
                raise errors.PreconditionFailed("The file exists (If-None-Match)") from None
            os.unlink(spool, dir_fd=parent)
        else:
            os.rename(spool, name, src_dir_fd=parent, dst_dir_fd=parent)
        os.fsync(parent)
        return os.fstat(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool, dir_fd=parent)
        raise
    finally:
        os.close(fd)
