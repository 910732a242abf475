"""The file service's protocol behaviour (aiocoap's "resource" half; the program around it owns
sockets, configuration and lifecycle).

Every request flows one way: options checked (`options`) → Uri-Path parsed and checked
(`tree.path`, `tree.hidden`) → who may do this, decided before anything is read or spooled
(`access.rules`) → the served tree (`tree.served`: cache or file system) → a response
(`blocks`). The resource speaks CoAP only: options, preconditions, blocks and codes; what the
tree refuses, and every OS error on the way, is answered by `errors` — the client's 4.xx, or
5.03 for what only the server can mend — never a 5.00.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiocoap
import aiocoap.error
from aiocoap.interfaces import ObservableResource
from aiocoap.numbers import ContentFormat, codes
from aiocoap.resource import Resource

from ..access.peer import Peer, peer_of
from ..access.rules import Rules, Verdict
from ..config.schema import ServiceConfig
from ..tree import problems
from ..tree.etag import derived_digest, etag_from_digest
from ..tree.hidden import check_visible
from ..tree.listing import render_listing
from ..tree.path import Key, Target, parse_uri_path
from ..tree.root import Root
from ..tree.served import ServedTree
from . import accesslog, errors, writes
from .blocks import block_response
from .contentformat import guess_content_format
from .observers import Observers
from .options import check_accept, check_conditions, check_options
from .upload import Uploads

log = logging.getLogger(__name__)

#: The link by which clients (and resource directories) find the file service.
SERVICE_LINK = '</>;ct=40;rt="tag:chrysn@fsfe.org,2022:fileserver"'
_WELL_KNOWN_CORE = (".well-known", "core")


@dataclass
class Counters:
    """Totals for the supervisor's status line."""

    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0


@dataclass(frozen=True)
class Prepared:
    """A new configuration with what can fail already done (its root opened), so applying it
    cannot fail: `FileService.apply`, or `discard` to drop it."""

    service: ServiceConfig
    root: Root | None

    def discard(self) -> None:
        if self.root is not None:
            self.root.close()


def _peer_once(request: aiocoap.Message) -> Callable[[], Peer]:
    """The request's peer, worked out only if a rule needs it, and then once."""
    found: list[Peer] = []

    def peer() -> Peer:
        if not found:
            found.append(peer_of(request.remote))
        return found[0]

    return peer


class FileService(Resource, ObservableResource):
    """Serves the tree below `service.root`: listings, files, and where the access rules allow
    writes, PUT and DELETE of files and directories; observations of files and directories are
    notified when the tree reports them stale."""

    def __init__(self, service: ServiceConfig) -> None:
        super().__init__()
        self.service = service
        self.rules = Rules(service.access, write_by_anyone=service.write)
        self.tree = ServedTree(service.root, service.cache)
        self._observers = Observers(self.tree, service.observe)
        self._uploads = Uploads(service.upload)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters = Counters()

    def stats(self) -> dict[str, Any]:
        """The tree's figures, observers, uploads and request counters."""
        return {
            **self.tree.stats(),
            "observers": len(self._observers),
            "uploads": len(self._uploads),
            "requests": self.counters.requests,
            "client_errors": self.counters.client_errors,
            "server_errors": self.counters.server_errors,
        }

    # --- lifecycle (driven by the supervisor) ----------------------------------------------

    def start(self, *, sweep: bool = True) -> None:
        """Start watching; with `sweep` (one process of a server does it), remove what
        interrupted writes left behind."""
        self.tree.start()
        if sweep and self.rules.writable_somewhere:
            self._spawn(self._sweep())

    async def _sweep(self) -> None:
        """Remove what interrupted writes left: at start-up what has been idle for longer than
        an upload may be, and once more when that holds for the rest (what a run killed just
        before left behind, which is younger than that at start-up)."""
        idle = self.service.upload.idle_timeout
        for delay in (0.0, idle):
            await asyncio.sleep(delay)
            removed = await self.tree.sweep(older_than=idle)
            if removed:
                log.info("Removed %d file(s) left behind by interrupted writes", removed)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._uploads.close()
        self.tree.close()
        self._observers.close()

    def end_observations(self, code: aiocoap.numbers.Code, reason: str) -> int:
        """End every observation with a final error notification (RFC 7641 4.2); how many."""
        return self._observers.end_all(code, reason)

    def prepare(self, service: ServiceConfig) -> Prepared:
        """Open what `service` needs (OSError if its root cannot be opened), changing nothing."""
        return Prepared(service, self.tree.open_root(service.root))

    def apply(self, prepared: Prepared) -> None:
        """Switch to a prepared configuration: root, access rules, ETags, [cache], [observe],
        [upload]; observers whose access the new rules revoke get a final 4.01/4.03."""
        old = self.service
        if prepared.root is not None:
            self.tree.switch_root(prepared.root)
        self.service = new = prepared.service
        self._observers.configure(new.observe)
        self._uploads.settings = new.upload
        self.tree.tune(new.cache)
        if (new.access, new.write) != (old.access, old.write):
            self.rules = Rules(new.access, write_by_anyone=new.write)
            self._observers.revoke(self.rules, lambda verdict: _refusal(verdict).to_message())

    # --- aiocoap's resource interface -------------------------------------------------------

    def get_resources_as_linkheader(self) -> str:
        """One link for the whole service; individual files are never registered."""
        return SERVICE_LINK

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        # GETs pick out the requested block themselves (reading only that block, and answering
        # any block cold); uploads are spooled block by block by `Uploads`, which (unlike
        # aiocoap's assembly) answers every block that does not fit with a 4.xx.
        return False

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        if not self.service.access_log:
            return await self._render_counted(request)
        started = time.perf_counter()
        try:
            response = await self._render_counted(request)
        except aiocoap.error.RenderableError as e:
            accesslog.log_request(request, e.to_message(), started)
            raise
        accesslog.log_request(request, response, started)
        return response

    async def _render_counted(self, request: aiocoap.Message) -> aiocoap.Message:
        self.counters.requests += 1
        try:
            check_options(request)
            response = await super().render(request)
        except problems.Problem as e:
            raise self._counted(errors.from_problem(e)) from None
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
        if e.code.class_ == 5 and not isinstance(e, errors.NotAProxy | errors.Busy):
            self.counters.server_errors += 1
        else:
            self.counters.client_errors += 1
        return e

    def _authorize(
        self, permission: str, target: Target, request: aiocoap.Message, *, beneath: bool = False
    ) -> None:
        """Refuse before anything is read or spooled: 4.05 where nothing is writable at all,
        4.01 where authenticating could help, 4.03 otherwise; the same whether or not the path
        exists."""
        if permission == "write" and not self.rules.writable_somewhere:
            raise errors.ReadOnly()
        decide = self.rules.decide_beneath if beneath else self.rules.decide
        verdict = decide(permission, target.segments, _peer_once(request))
        if verdict is not Verdict.ALLOWED:
            raise _refusal(verdict)

    # --- Observe ----------------------------------------------------------------------------

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        """Accept every observation of a GET of a valid path the peer may read; the first
        rendering answers errors (and an unsuccessful notification ends the observation, e.g.
        4.04 after deletion).

        Anything else is answered once, without Observe: aiocoap needs every observation
        accepted (it calls the cancellation callback regardless), and a PUT or DELETE must never
        be rendered again as a notification (that would repeat the write on every change)."""
        target = self._observable_target(request)
        peer = _peer_once(request)
        if (
            target is None
            or self.rules.decide("read", target.segments, peer) is not Verdict.ALLOWED
            or not self._observers.room_for(peer())
        ):
            serverobservation.accept(lambda: None)
            serverobservation.deregister()
            return
        self._observers.add(serverobservation, target, peer())

    def _observable_target(self, request: aiocoap.Message) -> Target | None:
        if request.code != codes.GET or request.opt.uri_path == _WELL_KNOWN_CORE:
            return None
        try:
            check_options(request)
            return _target(request)
        except (aiocoap.error.RenderableError, problems.Problem):
            return None

    # --- GET --------------------------------------------------------------------------------

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.uri_path == _WELL_KNOWN_CORE:
            check_accept(request, ContentFormat.LINKFORMAT)
            return aiocoap.Message(
                payload=SERVICE_LINK.encode("ascii"), content_format=ContentFormat.LINKFORMAT
            )
        target = _target(request)
        self._authorize("read", target, request)
        if request.opt.observe is not None:
            started = time.perf_counter()
            try:
                return self._get(request, target)
            finally:
                self._observers.timing.rendered(target.segments, time.perf_counter() - started)
        return self._get(request, target)

    def _get(self, request: aiocoap.Message, target: Target) -> aiocoap.Message:
        length = self.service.etag_length
        with self.tree.lookup(target) as found:
            entry = found.entry
            visible = None
            if entry.is_dir:
                content_format: ContentFormat | None = ContentFormat.LINKFORMAT
                digest, visible = self._listing_for(request, target.segments, found)
            else:
                stored = entry.content_format
                content_format = (
                    ContentFormat(stored)
                    if stored is not None
                    else guess_content_format(target.segments[-1])
                )
                digest = entry.digest
            check_accept(request, content_format)
            etag = etag_from_digest(digest, length)
            check_conditions(request, etag, exists=True)
            if etag is not None and etag in request.opt.etags:
                return aiocoap.Message(code=codes.VALID, etag=etag)
            if visible is not None:
                whole = render_listing(target.segments, visible)
                response = block_response(
                    request, len(whole), lambda offset, size: whole[offset : offset + size]
                )
            else:
                found.open()
                etag = etag_from_digest(found.entry.digest, length)
                response = block_response(request, found.size, found.read)
        if content_format is not None:
            response.opt.content_format = content_format
        response.opt.etag = etag
        return response

    def _listing_for(
        self, request: aiocoap.Message, key: Key, found: Any
    ) -> tuple[bytes, list[tuple[str, bool]] | None]:
        """A listing's digest and, where rules hide some entries from this peer, the entries
        it may see (None: the tree's listing, shown to everyone), rendered only if sent."""
        entry = found.entry
        if self.rules.uniform_beneath(key):
            return entry.digest, None
        peer = _peer_once(request)
        visible: list[tuple[str, bool]] = []
        hidden: list[tuple[str, bool]] = []
        for name, is_dir in entry.entries:
            allowed = self.rules.decide("read", (*key, name), peer) is Verdict.ALLOWED
            (visible if allowed else hidden).append((name, is_dir))
        if not hidden:
            return entry.digest, None
        variant = "\0".join(name for name, _ in hidden).encode("utf-8", "surrogateescape")
        return derived_digest(entry.digest, variant), visible

    # --- PUT and DELETE (carried out by `writes`) ---------------------------------------

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        target = _target(request)
        self._authorize("write", target, request)
        if target.is_dir_request:
            return writes.put_directory(self.tree, self.service, request, target)
        return await writes.put_file(self.tree, self._uploads, self.service, request, target)

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        target = _target(request)
        self._authorize("write", target, request, beneath=target.is_dir_request)
        if target.is_dir_request:
            await writes.delete_directory(self.tree, self.service, request, target)
        else:
            await writes.delete_file(self.tree, self.service, request, target)
        return aiocoap.Message(code=codes.DELETED)


def _refusal(verdict: Verdict) -> aiocoap.error.ConstructionRenderableError:
    if verdict is Verdict.UNAUTHENTICATED:
        return errors.Unauthorized()
    return errors.Refused()


def _target(request: aiocoap.Message) -> Target:
    target = parse_uri_path(request.opt.uri_path)
    check_visible(target.segments)
    return target
