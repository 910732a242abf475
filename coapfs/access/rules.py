"""Access rules: per path prefix of the served tree, who may `read` (GET, listings, Observe) and
who may `write` (PUT, DELETE, creating and deleting directories). The most specific prefix
governs; a rule that leaves `read` or `write` out takes it from the rule above it.

In the configuration (`[[access]]`, an array of tables)::

    [[access]]                  # firmware/ is public, only the CI uploader writes it
    path = "firmware/"
    read = "anyone"
    write = ":ci-uploader"

Without any rule, anyone may read and (with `write = true`, aiocoap-fileserver's meaning)
anyone or (by default) nobody may write: that is the rule for "/" unless one is configured.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..tree.path import Key
from .peer import Peer
from .principals import BadPrincipal, Principal, parse_principal

PERMISSIONS = ("read", "write")
_RULE_KEYS = ("path", "read", "write")


class BadRule(ValueError):
    """A rule that cannot be used: `where` names the rule and key (e.g. "[2].read"), `value`
    the offending value, the message what was expected."""

    def __init__(self, where: str, value: Any, expected: str) -> None:
        super().__init__(expected)
        self.where, self.value = where, value


@dataclass(frozen=True)
class AccessRule:
    """One configured rule; None: the permission is taken from the rule above."""

    path: Key
    read: tuple[Principal, ...] | None = None
    write: tuple[Principal, ...] | None = None

    @property
    def text(self) -> str:
        return "/" + "".join(s + "/" for s in self.path)

    def principals(self) -> Iterable[Principal]:
        return (*(self.read or ()), *(self.write or ()))


def _rule_path(where: str, value: Any) -> Key:
    expected = 'a path prefix of the served tree like "firmware/" ("/" for everything)'
    if not isinstance(value, str):
        raise BadRule(where, value, expected)
    segments = tuple(s for s in value.strip("/").split("/")) if value.strip("/") else ()
    for s in segments:
        if s in ("", ".", "..") or "\0" in s:
            raise BadRule(where, value, expected + " (no empty, '.' or '..' segments)")
    return segments


def _principals(where: str, value: Any) -> tuple[Principal, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadRule(where, value, "a principal or a list of them ([] = nobody)")
    out = []
    for item in items:
        try:
            out.append(parse_principal(item))
        except BadPrincipal as e:
            raise BadRule(where, item, str(e)) from None
    return tuple(out)


def parse_rules(value: Any) -> tuple[AccessRule, ...]:
    """The `[[access]]` array of tables, checked: each rule a table with `path` and at least
    one of `read`/`write`; each prefix only once."""
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise BadRule("", value, "an array of tables: [[access]] with path, read, write")
    rules: list[AccessRule] = []
    seen: dict[Key, int] = {}
    for i, raw in enumerate(value, start=1):
        where = f"[{i}]"
        unknown = sorted(set(raw) - set(_RULE_KEYS))
        if unknown:
            raise BadRule(f"{where}.{unknown[0]}", raw[unknown[0]], "one of path, read, write")
        if "path" not in raw:
            raise BadRule(where, raw, 'a "path" in every rule')
        path = _rule_path(f"{where}.path", raw["path"])
        if path in seen:
            raise BadRule(
                f"{where}.path", raw["path"], f"each prefix once (rule [{seen[path]}] has it)"
            )
        seen[path] = i
        if "read" not in raw and "write" not in raw:
            raise BadRule(where, raw, '"read" or "write" (or both) in every rule')
        read = _principals(f"{where}.read", raw["read"]) if "read" in raw else None
        write = _principals(f"{where}.write", raw["write"]) if "write" in raw else None
        rules.append(AccessRule(path, read, write))
    return tuple(rules)


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    #: Not granted as things stand, but an authenticated peer could be: 4.01.
    UNAUTHENTICATED = "unauthenticated"
    #: Not granted, and authenticating would not help (or did not): 4.03.
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class _Grants:
    read: tuple[Principal, ...]
    write: tuple[Principal, ...]

    def of(self, permission: str) -> tuple[Principal, ...]:
        return self.read if permission == "read" else self.write


_ANYONE = (parse_principal("anyone"),)


class Rules:
    """The configured rules with inheritance resolved, ready to decide requests."""

    def __init__(self, rules: Sequence[AccessRule], *, write_by_anyone: bool) -> None:
        root_default = AccessRule((), _ANYONE, _ANYONE if write_by_anyone else ())
        configured = {r.path: r for r in rules}
        root = configured.get((), root_default)
        self._grants: dict[Key, _Grants] = {
            (): _Grants(
                root.read if root.read is not None else root_default.read or (),
                root.write if root.write is not None else root_default.write or (),
            )
        }
        self._depth = max((len(r.path) for r in rules), default=0)
        for rule in sorted(rules, key=lambda r: len(r.path)):
            if rule.path == ():
                continue
            parent = self._governing(rule.path[:-1])
            self._grants[rule.path] = _Grants(
                rule.read if rule.read is not None else parent.read,
                rule.write if rule.write is not None else parent.write,
            )
        self.configured = tuple(rules)

    def _governing(self, key: Key) -> _Grants:
        for i in range(min(len(key), self._depth), -1, -1):
            grants = self._grants.get(key[:i])
            if grants is not None:
                return grants
        raise AssertionError("the root always has grants")

    def decide(self, permission: str, key: Key, peer: Callable[[], Peer]) -> Verdict:
        """May the peer (asked for only where the rule is not "anyone") do this at `key`?"""
        return _verdict(self._governing(key).of(permission), peer)

    def decide_beneath(self, permission: str, key: Key, peer: Callable[[], Peer]) -> Verdict:
        """The same for `key` and every rule beneath it (deleting a directory deletes what
        those rules protect): the first refusal, or ALLOWED."""
        verdict = self.decide(permission, key, peer)
        n = len(key)
        for path, grants in self._grants.items():
            if verdict is not Verdict.ALLOWED:
                break
            if len(path) > n and path[:n] == key:
                verdict = _verdict(grants.of(permission), peer)
        return verdict

    def uniform_beneath(self, key: Key) -> bool:
        """Whether every entry beneath `key` is governed as `key` itself is (no rule deeper)."""
        n = len(key)
        return not any(len(path) > n and path[:n] == key for path in self._grants)

    def anyone_may(self, permission: str, key: Key) -> bool:
        return any(p.kind == "anyone" for p in self._governing(key).of(permission))

    @property
    def writable_somewhere(self) -> bool:
        """Whether any rule grants writing to anybody (else the server is read-only: 4.05)."""
        return any(grants.write for grants in self._grants.values())

    @property
    def anyone_writes_somewhere(self) -> bool:
        return any(any(p.kind == "anyone" for p in g.write) for g in self._grants.values())

    def labels(self) -> set[str]:
        return {p.text for rule in self.configured for p in rule.principals() if p.kind == "label"}


def _verdict(grants: tuple[Principal, ...], peer: Callable[[], Peer]) -> Verdict:
    if any(p.kind == "anyone" for p in grants):
        return Verdict.ALLOWED
    if not grants:
        return Verdict.FORBIDDEN
    who = peer()
    if any(p.matches(who) for p in grants):
        return Verdict.ALLOWED
    if not who.authenticated and any(p.needs_authentication for p in grants):
        return Verdict.UNAUTHENTICATED
    return Verdict.FORBIDDEN
