"""The file service's protocol behaviour (aiocoap's "resource" half; the program around it owns
sockets, configuration and lifecycle).

Every request flows one way: options checked (`options`) → Uri-Path parsed and checked
(`tree.path`, `tree.hidden`) → the served tree (`tree.served`: cache or file system) → a
response (`blocks`). The resource speaks CoAP only: options, preconditions, blocks and codes;
what the tree refuses, and every OS error on the way, is answered by `errors` — the client's
4.xx, or 5.03 for what only the server can mend — never a 5.00.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiocoap
import aiocoap.error
from aiocoap.interfaces import ObservableResource
from aiocoap.numbers import ContentFormat, codes
from aiocoap.resource import Resource

from ..config.schema import ServiceConfig
from ..tree import problems
from ..tree.etag import etag_from_digest, etag_from_stat
from ..tree.hidden import check_visible
from ..tree.path import Target, parse_uri_path
from ..tree.root import Root
from ..tree.served import ServedTree
from ..tree.write import NameTaken, Place
from . import accesslog, errors
from .blocks import block_response
from .contentformat import guess_content_format
from .observe import Observations
from .options import check_accept, check_conditions, check_options
from .upload import Uploads

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


class FileService(Resource, ObservableResource):
    """Serves the tree below `service.root`: listings, files, and (if `write`) PUT and DELETE;
    observations of files and directories are notified when the tree reports them stale."""

    def __init__(self, service: ServiceConfig) -> None:
        super().__init__()
        self.service = service
        self.tree = ServedTree(service.root, service.cache)
        self._observations = Observations(service.observe.coalesce_ms / 1000)
        self.tree.on_stale = self._observations.changed
        self._observers: dict[Any, Any] = {}  # serverobservation -> (key, hold token)
        self._uploads = Uploads()
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

    def start(self) -> None:
        self.tree.start()

    def close(self) -> None:
        self.tree.close()
        self._observations.close()

    def end_observations(self, code: aiocoap.numbers.Code, reason: str) -> int:
        """End every observation with a final error notification (RFC 7641 4.2); how many."""
        for observation in list(self._observers):
            observation.trigger(aiocoap.Message(code=code, payload=reason.encode()), is_last=True)
        return len(self._observers)

    def prepare(self, service: ServiceConfig) -> Prepared:
        """Open what `service` needs (OSError if its root cannot be opened), changing nothing."""
        return Prepared(service, self.tree.open_root(service.root))

    def apply(self, prepared: Prepared) -> None:
        """Switch to a prepared configuration: root, write, ETags, [cache], [observe]."""
        if prepared.root is not None:
            self.tree.switch_root(prepared.root)
        self.service = prepared.service
        self._observations.coalesce = prepared.service.observe.coalesce_ms / 1000
        self.tree.tune(prepared.service.cache)

    # --- aiocoap's resource interface -------------------------------------------------------

    def get_resources_as_linkheader(self) -> str:
        """One link for the whole service; individual files are never registered."""
        return SERVICE_LINK

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        # GETs pick out the requested block themselves (reading only that block, and answering
        # any block cold); uploads are assembled by `Uploads`, which (unlike aiocoap's spool)
        # answers every block that does not fit with a 4.xx.
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
        if e.code.class_ == 5 and not isinstance(e, errors.NotAProxy):
            self.counters.server_errors += 1
        else:
            self.counters.client_errors += 1
        return e

    # --- Observe ----------------------------------------------------------------------------

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
        token = self.tree.hold(target)
        self._observations.add(target.segments, serverobservation)
        self._observers[serverobservation] = (target.segments, token)
        serverobservation.accept(lambda: self._observation_ended(serverobservation))

    def _observable_target(self, request: aiocoap.Message) -> Target | None:
        if request.code != codes.GET or request.opt.uri_path == _WELL_KNOWN_CORE:
            return None
        try:
            check_options(request)
            return _target(request)
        except (aiocoap.error.RenderableError, problems.Problem):
            return None

    def _observation_ended(self, serverobservation: Any) -> None:
        key, token = self._observers.pop(serverobservation)
        self._observations.remove(key, serverobservation)
        self.tree.release(token)

    # --- GET --------------------------------------------------------------------------------

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.uri_path == _WELL_KNOWN_CORE:
            check_accept(request, ContentFormat.LINKFORMAT)
            return aiocoap.Message(
                payload=SERVICE_LINK.encode("ascii"), content_format=ContentFormat.LINKFORMAT
            )
        target = _target(request)
        length = self.service.etag_length
        with self.tree.lookup(target) as found:
            if found.entry.is_dir:
                content_format = ContentFormat.LINKFORMAT
            else:
                content_format = guess_content_format(target.segments[-1])
            check_accept(request, content_format)
            etag = etag_from_digest(found.entry.digest, length)
            check_conditions(request, etag, exists=True)
            if etag is not None and etag in request.opt.etags:
                return aiocoap.Message(code=codes.VALID, etag=etag)
            found.open()
            etag = etag_from_digest(found.entry.digest, length)
            response = block_response(request, found.size, found.read)
        if content_format is not None:
            response.opt.content_format = content_format
        response.opt.etag = etag
        return response

    # --- PUT and DELETE ---------------------------------------------------------------------

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        self._check_writable()
        _target(request)  # a bad path is refused at its first block, before any spooling
        payload = self._uploads.feed(request, space=self.tree.space_left())
        if payload is None:
            return aiocoap.Message(code=codes.CONTINUE, block1=request.opt.block1)
        place = self._place(
            request, "PUT needs a file name (directories are not created over CoAP)"
        )
        try:
            no_replace = bool(request.opt.if_none_match)
            st = await self.tree.replace(place, payload, no_replace=no_replace)
        except NameTaken:
            raise errors.PreconditionFailed("The file exists (If-None-Match)") from None
        finally:
            place.close()
        created = place.existing is None
        etag = etag_from_stat(st, self.service.etag_length)
        accesslog.log_change(request, "created" if created else "replaced", st.st_size, etag)
        response = aiocoap.Message(code=codes.CREATED if created else codes.CHANGED, etag=etag)
        response.opt.block1 = request.opt.block1
        return response

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        place = self._place(request, "Directories are not deleted over CoAP")
        try:
            self.tree.delete(place)
        finally:
            place.close()
        accesslog.log_change(request, "deleted", None, None)
        return aiocoap.Message(code=codes.DELETED)

    def _check_writable(self) -> None:
        """PUT and DELETE on a read-only server answer 4.05."""
        if not self.service.write:
            raise errors.ReadOnly()

    def _place(self, request: aiocoap.Message, directory_refusal: str) -> Place:
        """For PUT and DELETE: where the write lands, with If-Match and If-None-Match checked
        against the file there now."""
        self._check_writable()
        target = _target(request)
        if target.is_dir_request:
            raise errors.BadPath(directory_refusal)
        place = self.tree.place(target, directory_refusal)
        try:
            existing = place.existing
            etag = None if existing is None else etag_from_stat(existing, self.service.etag_length)
            check_conditions(request, etag, exists=existing is not None)
        except BaseException:
            place.close()
            raise
        return place


def _target(request: aiocoap.Message) -> Target:
    target = parse_uri_path(request.opt.uri_path)
    check_visible(target.segments)
    return target
