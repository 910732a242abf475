"""PUT and DELETE, once the access rules allowed them: files uploaded through `upload` and
committed by the tree under a lock (preconditions checked against what is there then),
directories made and deleted, every change logged (`accesslog.log_change`)."""

from __future__ import annotations

from typing import Any

import aiocoap
from aiocoap.numbers import codes

from ..config.schema import ServiceConfig
from ..tree import problems
from ..tree.etag import etag_from_stat
from ..tree.path import Target
from ..tree.served import ServedTree
from ..tree.spool import Check, NameTaken, Spool
from ..tree.write import NotEmpty, Place
from . import accesslog, errors
from .options import check_conditions
from .upload import Uploads

#: If-Match value that deletes a directory only if it is empty (RIOT's nanocoap fileserver,
#: COAPFILESERVER_DIR_DELETE_ETAG, in network byte order).
EMPTY_DIRECTORY_ETAG = bytes.fromhex("6ce88b56")


def checked_place(
    tree: ServedTree, service: ServiceConfig, request: aiocoap.Message, target: Target
) -> Place:
    """Where a write to `target` lands, with If-Match and If-None-Match checked against what
    is there now (close it when done)."""
    place = tree.place(target)
    try:
        existing = place.existing
        etag = None if existing is None else etag_from_stat(existing, service.etag_length)
        check_conditions(request, etag, exists=existing is not None)
    except BaseException:
        place.close()
        raise
    return place


async def put_file(
    tree: ServedTree,
    uploads: Uploads,
    service: ServiceConfig,
    request: aiocoap.Message,
    target: Target,
) -> aiocoap.Message:
    """A block of an upload (2.31 until the last), or the upload committed (2.01/2.04)."""

    def open_spool() -> Spool:
        # Preconditions now, before anything is spooled; again under the lock at the commit.
        place = checked_place(tree, service, request, target)
        return tree.spool(place, service.upload.file_mode)

    spool = uploads.feed(request, open_spool, tree.space_left)
    if spool is None:
        return aiocoap.Message(code=codes.CONTINUE, block1=request.opt.block1)
    length = service.etag_length
    stored = request.opt.content_format
    try:
        st, created = await tree.commit(
            spool,
            _conditions(request, length),
            create_only=bool(request.opt.if_none_match),
            content_format=int(stored) if stored is not None else None,
        )
    except NameTaken:
        raise errors.PreconditionFailed("The file exists (If-None-Match)") from None
    etag = etag_from_stat(st, length)
    accesslog.log_change(request, "created" if created else "replaced", st.st_size, etag)
    response = aiocoap.Message(code=codes.CREATED if created else codes.CHANGED, etag=etag)
    response.opt.block1 = request.opt.block1
    return response


def _conditions(request: aiocoap.Message, etag_length: int) -> Check:
    """If-Match and If-None-Match as a check of what is at the name (None: nothing)."""

    def check(existing: Any) -> None:
        etag = None if existing is None else etag_from_stat(existing, etag_length)
        check_conditions(request, etag, exists=existing is not None)

    return check


def put_directory(
    tree: ServedTree, service: ServiceConfig, request: aiocoap.Message, target: Target
) -> aiocoap.Message:
    """`PUT dir/`: make the directory (2.01), or find it there (2.04); parents must exist. It
    carries no content: a payload is refused (most likely a file upload with a stray slash)."""
    place = checked_place(tree, service, request, target)
    try:
        if request.payload or request.opt.block1 is not None:
            raise errors.DirectoryPayload()
        if place.existing is not None:
            code, st = codes.CHANGED, place.existing
        else:
            try:
                st = tree.make_directory(place, service.upload.directory_mode)
            except FileExistsError:
                if request.opt.if_none_match:
                    raise errors.PreconditionFailed("It exists (If-None-Match)") from None
                raise problems.Conflict("Something appeared at that name meanwhile") from None
            code = codes.CREATED
            accesslog.log_change(request, "directory created", None, None)
    finally:
        place.close()
    return aiocoap.Message(code=code, etag=etag_from_stat(st, service.etag_length))


async def delete_file(
    tree: ServedTree, service: ServiceConfig, request: aiocoap.Message, target: Target
) -> None:
    """DELETE of a file: the preconditions checked now, and again under the writers' lock."""
    place = checked_place(tree, service, request, target)
    try:
        await tree.delete_file(place, _conditions(request, service.etag_length))
    finally:
        place.close()
    accesslog.log_change(request, "deleted", None, None)


async def delete_directory(
    tree: ServedTree, service: ServiceConfig, request: aiocoap.Message, target: Target
) -> None:
    """`DELETE dir/`: with its contents; with If-Match carrying RIOT's empty-directory ETag
    only if empty, with the listing's ETag only if unchanged."""
    wanted = request.opt.if_match
    only_if_empty = EMPTY_DIRECTORY_ETAG in wanted
    if only_if_empty:
        request = request.copy(if_match=[e for e in wanted if e != EMPTY_DIRECTORY_ETAG])
    place = checked_place(tree, service, request, target)
    try:
        if place.existing is None:
            raise problems.NotFound()
        try:
            await tree.delete_directory(place, only_if_empty=only_if_empty)
        except NotEmpty:
            raise errors.PreconditionFailed("The directory is not empty") from None
    finally:
        place.close()
    accesslog.log_change(request, "directory deleted", None, None)
