"""OSCORE without lakers: make aiocoap's OSCORE usable where EDHOC's library is missing.

aiocoap's OSCORE transport (`aiocoap.transports.oscore`) and its server wrapper
(`aiocoap.oscore_sitewrapper`) import `aiocoap.edhoc`, which imports `lakers` (lakers-python, the
EDHOC implementation) at module level. Debian 13 packages no lakers, so on a stock system even plain
OSCORE fails with `ModuleNotFoundError: No module named 'lakers'` (aiocoap 0.4.14 and 0.4.17 alike).
Plain OSCORE never touches lakers: aiocoap uses it only inside EDHOC functions.

`prepare_credentials` is called before any server context is built (and by --check-config).
When lakers cannot be imported it registers a placeholder module under the name `lakers`, so
those imports succeed; any use of the placeholder raises `EdhocUnavailableError` naming the
missing package. It also reads the credentials file and refuses one that configures EDHOC while
lakers is missing, so the daemon says so in one line at start-up instead of failing on the first
EDHOC request. Where lakers-python is installed, nothing is replaced and EDHOC works as usual.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LAKERS = "lakers"
EDHOC_KEY = "edhoc-oscore"


class CredentialsError(ValueError):
    """The credentials file cannot be used. `str()` is one line: `<file>: <problem>`.

    The supervisor reports it like any configuration error (key `credentials`, exit 78).
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class EdhocUnavailableError(ImportError):
    """Raised when code reaches for the placeholder `lakers` module: EDHOC needs lakers-python."""


class _MissingLakers(types.ModuleType):
    """Stands in for `lakers` so aiocoap's module-level `import lakers` succeeds.

    Any attribute beyond a module's own dunders raises EdhocUnavailableError, so EDHOC cannot be
    used by accident, and the error says what to install.
    """

    placeholder = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise EdhocUnavailableError(
            f"EDHOC is unavailable: lakers-python is not installed (needed for lakers.{name})",
            name=LAKERS,
        )


def lakers_available() -> bool:
    """True when the real lakers-python can be imported (EDHOC works)."""
    module = sys.modules.get(LAKERS)
    if module is not None:
        return not getattr(module, "placeholder", False)
    try:
        importlib.import_module(LAKERS)
    except ImportError:
        return False
    return True


def _install_placeholder() -> None:
    """Register the placeholder, only when the real module cannot be imported."""
    if not lakers_available():
        sys.modules[LAKERS] = _MissingLakers(LAKERS, "placeholder: lakers-python is not installed")


def _read(path: Path) -> Any:
    """Parse the file the way aiocoap's server_context_from_arguments does: EDN if cbor-diag is
    installed (JSON is valid EDN), otherwise JSON."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CredentialsError(path, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CredentialsError(
            path, "not text (expected JSON or CBOR diagnostic notation)"
        ) from None
    try:
        import cbor2
        import cbor_diag
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise CredentialsError(path, f"not valid JSON or EDN: {e}") from None
    try:
        return cbor2.loads(cbor_diag.diag2cbor(text))
    except ValueError as e:
        detail = " ".join(str(e).split())
        raise CredentialsError(path, f"not valid JSON or EDN: {detail}") from None


def _edhoc_entries(data: Any, label: str = "") -> Iterator[str]:
    """Labels of the credential entries that use EDHOC, also inside any-of/all-of nesting."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = label or str(key)
            if key == EDHOC_KEY:
                yield here
            else:
                yield from _edhoc_entries(value, here)
    elif isinstance(data, list):
        for item in data:
            yield from _edhoc_entries(item, label)


def credential_labels(path: Path | None) -> set[str]:
    """The labels (keys) of a credentials file: what access rules may name as ":label"."""
    if path is None:
        return set()
    data = _read(path)
    return {str(k) for k in data} if isinstance(data, dict) else set()


def prepare_credentials(path: Path | None) -> None:
    """Make aiocoap's OSCORE importable and check that `path` needs nothing that is missing.

    Call it before building server contexts, on every (re)load, and from --check-config; it is
    cheap and idempotent. `path` None means no credentials: only the import fix applies. It does
    not open security contexts (that takes their lock files); aiocoap does that when the context
    is created. Raises CredentialsError for an unreadable or unparsable file, one that is not a
    map, or one that configures EDHOC while lakers-python is missing.
    """
    _install_placeholder()
    if path is None:
        return
    data = _read(path)
    if not isinstance(data, dict):
        raise CredentialsError(path, "expected a map of URI patterns to credentials")
    if lakers_available():
        return
    edhoc = sorted(set(_edhoc_entries(data)))
    if edhoc:
        entries = ", ".join(repr(e) for e in edhoc)
        raise CredentialsError(
            path,
            f"entry {entries} configures EDHOC ({EDHOC_KEY}), which needs lakers-python;"
            " it is not installed (plain OSCORE works without it)",
        )
