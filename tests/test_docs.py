"""The manual pages say what the program does (issue 12.7, 12.9): coap-fileserver.toml(5) lists
every configuration key with its built-in default, both pages render without a groff warning,
and every example that changes a setting does so in a drop-in, never in the conffile."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from coapfs.config.schema import iter_keys

from support.repo import REPO
from support.tools import require

PAGES = [REPO / "doc" / "coap-fileserver.8", REPO / "doc" / "coap-fileserver.toml.5"]
CONFFILE = "/etc/coap-fileserver.toml"
DROPINS = "/etc/coap-fileserver.d/"


def render(page: Path) -> str:
    """The page as man shows it, in plain ASCII, one paragraph per line (no hyphenation)."""
    groff = require("groff", "groff-base")
    result = subprocess.run(
        [groff, "-man", "-ww", "-Tascii", "-rLL=3000n", "-rHY=0", "-P-cbou", str(page)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stderr == "", result.stderr  # groff's warnings (-ww: all of them)
    return result.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_renders_without_warnings(page: Path) -> None:
    assert "NAME" in render(page)


def toml_text(key: str, value: Any) -> str:
    """A default as the page writes it: TOML, modes in octal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '""'
    if isinstance(value, int) and key.endswith("_mode"):
        return f"0o{value:o}"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_text(key, v) for v in value) + "]"
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return f'"{value}"'
    return f'"{value}"'


def documented_keys() -> dict[str, str]:
    """dotted key -> the default the KEYS section of coap-fileserver.toml(5) gives it."""
    text = render(REPO / "doc" / "coap-fileserver.toml.5")
    keys: dict[str, str] = {}
    table = None
    for line in text.splitlines():
        if line == "KEYS":
            table = ""
        elif table is None:
            continue
        elif re.fullmatch(r"[A-Z][A-Z ]+", line):
            break  # the next section
        elif m := re.fullmatch(r"   \[(\w+)\]", line):
            table = m.group(1) + "."
        elif m := re.fullmatch(r"       (\w+) = (.+)", line):
            keys[table + m.group(1)] = m.group(2)
    return keys


def test_every_key_is_documented_with_its_default() -> None:
    documented = documented_keys()
    schema = {key: toml_text(key, default) for key, default, _help in iter_keys()}
    assert sorted(documented) == sorted(schema)
    assert documented == schema


def paragraphs() -> list[tuple[str, str]]:
    """(where, paragraph) for each rendered paragraph of the pages and the write.conf example."""
    out = []
    for page in PAGES:
        for paragraph in re.split(r"\n\s*\n", render(page)):
            out.append((page.name, " ".join(paragraph.split())))
    example = (REPO / "systemd" / "write.conf").read_text()
    out.append(("write.conf", " ".join(example.replace("#", " ").split())))
    return out


def test_examples_change_settings_in_a_drop_in() -> None:
    """An edited conffile stops an unattended upgrade at dpkg's prompt: the pages never tell to
    set a key in /etc/coap-fileserver.toml, and where they tell to set one, they name a drop-in."""
    tells = re.compile(r"\b(set|put|change|edit|add|uncomment|remove the #)\b", re.IGNORECASE)
    for where, text in paragraphs():
        for sentence in re.split(r"(?<=[.;:])\s", text):
            if tells.search(sentence) and CONFFILE in sentence:
                # Naming the shipped file is fine where it says to leave it alone.
                assert re.search(r"\b(leave|as shipped|as it is)\b", sentence), (where, sentence)
    writing = next(t for w, t in paragraphs() if "set write = true in" in t)
    assert f"{DROPINS}write.toml" in writing, writing
    conf = next(t for w, t in paragraphs() if w == "write.conf")
    assert f"{DROPINS}write.toml" in conf, conf
    example = render(REPO / "doc" / "coap-fileserver.toml.5").split("\nEXAMPLE\n", 1)[1]
    files = re.findall(r"^\s+# (/etc/\S+)$", example, re.MULTILINE)
    assert files == [f"{DROPINS}local.toml"], example
