"""The file service's protocol behaviour (aiocoap's "resource" half; the program around it owns
sockets, configuration and lifecycle).

Every request flows one way: Uri-Path → `resolve` (a safe path beneath the root) → `access`
(hidden names, write permission) → the file system → a response. Every OS error on that way is
the client's 4.xx (see `errors`), never a 5.00.
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

import aiocoap
import aiocoap.error
from aiocoap.numbers import ContentFormat, codes
from aiocoap.optiontypes import BlockOption
from aiocoap.resource import Resource

from . import access, errors, listing
from .contentformat import guess_content_format
from .etag import etag_from_stat
from .resolve import Root, Target, parse_uri_path

log = logging.getLogger("coapfs")

#: The link by which clients (and resource directories) find the file service.
SERVICE_LINK = '</>;ct=40;rt="tag:chrysn@fsfe.org,2022:fileserver"'
_WELL_KNOWN_CORE = (".well-known", "core")
_DEFAULT_SZX = 6  # 1024-byte blocks unless the client asks for smaller ones


@dataclass
class Counters:
    """Totals for the supervisor's status line."""

    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0


class FileServer(Resource):
    """Serves the directory tree below `root`: listings, files, and (if `write`) PUT and DELETE."""

    def __init__(
        self,
        root: Path,
        *,
        write: bool = False,
        etag_length: int = 8,
        show_hidden: bool = False,
    ) -> None:
        super().__init__()
        self._root = Root(root)
        self._root_path = Path(root)
        self._write = write
        self._etag_length = etag_length
        self._show_hidden = show_hidden
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

    def reconfigure(self, *, root: Path, write: bool, etag_length: int) -> None:
        """Apply a live change; a bad new root raises OSError and leaves everything as it was."""
        if Path(root) != self._root_path:
            new_root = Root(root)
            old, self._root, self._root_path = self._root, new_root, Path(root)
            old.close()
        self._write = write
        self._etag_length = etag_length

    def close(self) -> None:
        self._root.close()

    def get_resources_as_linkheader(self) -> str:
        """One link for the whole service; individual files are never registered."""
        return SERVICE_LINK

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        # GETs pick out the requested block themselves (reading only that block, and answering
        # any block cold); uploads are assembled by aiocoap.
        return request.code != codes.GET

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        self.counters.requests += 1
        try:
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
        if e.code.class_ == 5:
            self.counters.server_errors += 1
        else:
            self.counters.client_errors += 1
        return e

    # GET

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.uri_path == _WELL_KNOWN_CORE:
            return aiocoap.Message(
                payload=SERVICE_LINK.encode("ascii"), content_format=ContentFormat.LINKFORMAT
            )
        target = self._target(request)
        fd, st = self._root.open_for_reading(target.segments)
        try:
            if stat.S_ISDIR(st.st_mode):
                if not target.is_dir_request:
                    raise errors.NotAFile()
            elif target.is_dir_request:
                raise errors.NotADirectory()

            etag = etag_from_stat(st, self._etag_length)
            if etag is not None and etag in request.opt.etags:
                return aiocoap.Message(code=codes.VALID, etag=etag)

            if stat.S_ISDIR(st.st_mode):
                body = self._listing(fd, target)
                response = _block_response(
                    request, len(body), lambda offset, size: body[offset : offset + size]
                )
                response.opt.content_format = ContentFormat.LINKFORMAT
            else:
                response = _block_response(
                    request, st.st_size, lambda offset, size: os.pread(fd, size, offset)
                )
                content_format = guess_content_format(target.segments[-1])
                if content_format is not None:
                    response.opt.content_format = content_format
            response.opt.etag = etag
            return response
        finally:
            os.close(fd)

    def _listing(self, dirfd: int, target: Target) -> bytes:
        def resolve_link(name: str) -> os.stat_result | None:
            try:
                fd = self._root.open_path((*target.segments, name))
            except OSError:
                return None
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)

        entries = listing.read_entries(dirfd, resolve_link, show_hidden=self._show_hidden)
        return listing.render_listing(target.segments, entries)

    # PUT and DELETE

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        access.check_writable(self._write)
        target = self._target(request)
        if target.is_dir_request:
            raise errors.BadPath("PUT needs a file name (directories are not created over CoAP)")
        parent = self._open_parent(target)
        try:
            name = target.segments[-1]
            existing = self._existing(parent, target)
            if existing is not None and request.opt.if_none_match:
                raise errors.PreconditionFailed("The file exists (If-None-Match)")
            self._check_if_match(request, existing)
            st = await asyncio.to_thread(
                _replace_atomically,
                parent,
                name,
                request.payload,
                existing,
                no_replace=bool(request.opt.if_none_match),
            )
        finally:
            os.close(parent)
        code = codes.CREATED if existing is None else codes.CHANGED
        return aiocoap.Message(code=code, etag=etag_from_stat(st, self._etag_length))

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        access.check_writable(self._write)
        target = self._target(request)
        if target.is_dir_request:
            raise errors.BadPath("Directories are not deleted over CoAP")
        parent = self._open_parent(target)
        try:
            existing = self._existing(parent, target)
            self._check_if_match(request, existing)
            if existing is None:
                raise errors.NotFound()
            os.unlink(target.segments[-1], dir_fd=parent)
        finally:
            os.close(parent)
        return aiocoap.Message(code=codes.DELETED)

    def _open_parent(self, target: Target) -> int:
        try:
            return self._root.open_parent(target.segments)
        except (FileNotFoundError, NotADirectoryError):
            raise errors.NotFound("Parent directory does not exist") from None

    def _existing(self, parent: int, target: Target) -> os.stat_result | None:
        """The regular file a write would replace (None if there is none); directories and
        symbolic links are refused, so a write never reaches past the name it was sent to."""
        try:
            lst = os.stat(target.segments[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(lst.st_mode):
            raise errors.NotAFile("Is a directory")
        if not stat.S_ISREG(lst.st_mode):
            raise errors.Forbidden("Only regular files can be written or deleted")
        return lst

    def _check_if_match(self, request: aiocoap.Message, existing: os.stat_result | None) -> None:
        wanted = request.opt.if_match
        if not wanted:
            return
        if existing is None:
            raise errors.PreconditionFailed("The file does not exist (If-Match)")
        if b"" in wanted:
            return
        if etag_from_stat(existing, self._etag_length) not in wanted:
            raise errors.PreconditionFailed("The file has changed (If-Match)")

    def _target(self, request: aiocoap.Message) -> Target:
        target = parse_uri_path(request.opt.uri_path)
        access.check_visible(target.segments, show_hidden=self._show_hidden)
        return target


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
