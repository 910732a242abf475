"""The observations being served (RFC 7641): whom, of what, and within the limits — at most
`max_per_peer` per client endpoint and `max_total` in all (beyond, a GET is answered unobserved,
which RFC 7641 3.1 lets a server do). `observe.Observations` decides when they are notified."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiocoap

from ..access.peer import Peer
from ..access.rules import Rules, Verdict
from ..config.schema import ObserveConfig
from ..tree.path import Target
from ..tree.served import ServedTree
from .observe import Observations


@dataclass(frozen=True)
class _Observed:
    target: Target
    peer: Peer
    hold: int  # the tree's token for the watches the observation needs


class Observers:
    """aiocoap's ServerObservations, each with what it observes and for whom."""

    def __init__(self, tree: ServedTree, settings: ObserveConfig) -> None:
        self.settings = settings
        self.timing = Observations(settings.coalesce_ms / 1000)
        tree.on_stale = self.timing.changed
        self._tree = tree
        self._observed: dict[Any, _Observed] = {}
        self._per_endpoint: dict[tuple[Any, Any], int] = {}

    def __len__(self) -> int:
        return len(self._observed)

    def configure(self, settings: ObserveConfig) -> None:
        self.settings = settings
        self.timing.coalesce = settings.coalesce_ms / 1000

    def room_for(self, peer: Peer) -> bool:
        if len(self._observed) >= self.settings.max_total:
            return False
        return self._per_endpoint.get((peer.address, peer.port), 0) < self.settings.max_per_peer

    def add(self, observation: Any, target: Target, peer: Peer) -> None:
        hold = self._tree.hold(target)
        self.timing.add(target.segments, observation)
        self._observed[observation] = _Observed(target, peer, hold)
        endpoint = (peer.address, peer.port)
        self._per_endpoint[endpoint] = self._per_endpoint.get(endpoint, 0) + 1
        observation.accept(lambda: self._ended(observation))

    def _ended(self, observation: Any) -> None:
        observed = self._observed.pop(observation)
        self.timing.remove(observed.target.segments, observation)
        self._tree.release(observed.hold)
        endpoint = (observed.peer.address, observed.peer.port)
        left = self._per_endpoint.pop(endpoint, 1) - 1
        if left > 0:
            self._per_endpoint[endpoint] = left

    def revoke(self, rules: Rules, refusal: Callable[[Verdict], aiocoap.Message]) -> None:
        """After new access rules: a final refusal to whoever may no longer read what they
        observe (which ends it), and every other observation rendered afresh (what a listing
        shows may have changed)."""
        for observation, observed in list(self._observed.items()):
            verdict = rules.decide("read", observed.target.segments, _given(observed.peer))
            if verdict is not Verdict.ALLOWED:
                observation.trigger(refusal(verdict), is_last=True)
        self.timing.changed((), True)

    def end_all(self, code: aiocoap.numbers.Code, reason: str) -> int:
        """End every observation with a final error notification (RFC 7641 4.2); how many."""
        for observation in list(self._observed):
            observation.trigger(aiocoap.Message(code=code, payload=reason.encode()), is_last=True)
        return len(self._observed)

    def close(self) -> None:
        self.timing.close()


def _given(peer: Peer) -> Callable[[], Peer]:
    return lambda: peer
