"""Property-based (hypothesis, stateful): PUT, DELETE, `PUT dir/` and `DELETE dir/`, with and
without If-Match / If-None-Match, against a model of the tree, through the real server over
UDP with the real aiocoap client. After every step the response code is the model's, and the
tree on disk is the model's, byte for byte.

Over UDP rather than in-process: a request costs a few milliseconds on loopback, so the modest
budget here (a few hundred requests) runs in seconds, and the whole path is exercised — message
layer, deduplication, amplification gate (loopback is trusted), resource, tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiocoap
import pytest

from support.client import Client
from support.server import Servers
from support.tools import missing

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
except ImportError:  # the Debian package build has no hypothesis
    missing("hypothesis is not installed (pip install hypothesis)")

EMPTY_DIRECTORY_ETAG = bytes.fromhex("6ce88b56")
DIRECTORIES = ("d1", "d2", "d1/d2")  # every place a file or directory may be made
FILES = tuple(f"{d}/{n}" if d else n for d in ("", *DIRECTORIES) for n in ("f1", "f2"))
CONDITIONS = ("none", "if-none-match", "if-match-current", "if-match-stale", "if-match-exists")


class Tree(RuleBasedStateMachine):
    """The model: directories, and files with their content and last ETag."""

    client: Client
    base: str
    root: Path

    def __init__(self) -> None:
        super().__init__()
        for child in self.root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.dirs: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.etags: dict[str, bytes] = {}

    def _request(self, code, name: str, payload: bytes = b"", **options) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri=f"{self.base}/{name}", payload=payload, **options)
        return self.client.request(message, timeout=20)

    def _options(self, condition: str, name: str) -> dict:
        if condition == "if-none-match":
            return {"if_none_match": True}
        if condition == "if-match-current":
            return {"if_match": [self.etags.get(name, b"\x00\x01\x02\x03")]}
        if condition == "if-match-stale":
            return {"if_match": [b"stale!!!"]}
        if condition == "if-match-exists":
            return {"if_match": [b""]}
        return {}

    def _holds(self, condition: str, name: str, exists: bool) -> bool:
        if condition == "if-none-match":
            return not exists
        if condition == "if-match-current":
            return exists and name in self.etags
        if condition == "if-match-stale":
            return False
        return condition == "none" or exists

    def _parent_exists(self, name: str) -> bool:
        parent = name.rpartition("/")[0]
        return parent == "" or parent in self.dirs

    @rule(name=st.sampled_from(FILES), content=st.binary(max_size=40),
          condition=st.sampled_from(CONDITIONS))  # fmt: skip
    def put_file(self, name: str, content: bytes, condition: str) -> None:
        response = self._request(aiocoap.PUT, name, content, **self._options(condition, name))
        exists = name in self.files
        if not self._parent_exists(name):
            expected = {aiocoap.NOT_FOUND}
        elif not self._holds(condition, name, exists):
            expected = {aiocoap.PRECONDITION_FAILED}
        else:
            expected = {aiocoap.CHANGED if exists else aiocoap.CREATED}
        assert response.code in expected, (name, condition, response, response.payload)
        if response.code.is_successful():
            self.files[name] = content
            self.etags[name] = response.opt.etag

    @rule(name=st.sampled_from(FILES), condition=st.sampled_from(CONDITIONS))
    def delete_file(self, name: str, condition: str) -> None:
        response = self._request(aiocoap.DELETE, name, **self._options(condition, name))
        exists = name in self.files
        if not self._parent_exists(name):
            expected = {aiocoap.NOT_FOUND}  # whatever the preconditions say
        elif not exists and condition in ("none", "if-none-match"):
            expected = {aiocoap.NOT_FOUND}
        elif not self._holds(condition, name, exists):
            expected = {aiocoap.PRECONDITION_FAILED}
        else:
            expected = {aiocoap.DELETED}
        assert response.code in expected, (name, condition, response, response.payload)
        if response.code.is_successful():
            del self.files[name]
            self.etags.pop(name, None)

    @rule(name=st.sampled_from(DIRECTORIES), if_none_match=st.booleans())
    def put_directory(self, name: str, if_none_match: bool) -> None:
        options = {"if_none_match": True} if if_none_match else {}
        response = self._request(aiocoap.PUT, f"{name}/", **options)
        exists = name in self.dirs
        if not self._parent_exists(name):
            expected = {aiocoap.NOT_FOUND}
        elif exists and if_none_match:
            expected = {aiocoap.PRECONDITION_FAILED}
        else:
            expected = {aiocoap.CHANGED if exists else aiocoap.CREATED}
        assert response.code in expected, (name, if_none_match, response, response.payload)
        self.dirs.add(name) if response.code.is_successful() else None

    @rule(name=st.sampled_from(DIRECTORIES), only_if_empty=st.booleans())
    def delete_directory(self, name: str, only_if_empty: bool) -> None:
        options = {"if_match": [EMPTY_DIRECTORY_ETAG]} if only_if_empty else {}
        response = self._request(aiocoap.DELETE, f"{name}/", **options)
        inside = [p for p in (*self.dirs, *self.files) if p.startswith(name + "/")]
        if name not in self.dirs:
            expected = {aiocoap.NOT_FOUND}
        elif only_if_empty and inside:
            expected = {aiocoap.PRECONDITION_FAILED}
        else:
            expected = {aiocoap.DELETED}
        assert response.code in expected, (name, only_if_empty, response, response.payload)
        if response.code.is_successful():
            self.dirs -= {name, *inside}
            for gone in inside:
                self.files.pop(gone, None)
                self.etags.pop(gone, None)

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def get_file(self, data) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        response = self._request(aiocoap.GET, name)
        assert response.code == aiocoap.CONTENT and response.payload == self.files[name]
        assert response.opt.etag == self.etags[name]

    @invariant()
    def the_disk_is_the_model(self) -> None:
        on_disk = {str(p.relative_to(self.root)): p for p in self.root.rglob("*")}
        assert {n for n, p in on_disk.items() if p.is_dir()} == self.dirs
        assert {n: p.read_bytes() for n, p in on_disk.items() if p.is_file()} == self.files


def test_writes_follow_the_model(start_server: Servers, client: Client, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    server = start_server(root, "--write")
    Tree.client, Tree.base, Tree.root = client, server.base, root
    Tree.TestCase.settings = settings(
        max_examples=25,
        stateful_step_count=12,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    test_case = Tree.TestCase("runTest")
    test_case.runTest()


def test_the_model_sees_a_wrong_answer(start_server: Servers, client: Client, tmp_path) -> None:
    """A model that cannot fail is no model: with a file the model does not know of, a
    creating PUT gets 2.04 where the model expects 2.01, and that is caught."""
    root = tmp_path / "root"
    root.mkdir()
    server = start_server(root, "--write")
    Tree.client, Tree.base, Tree.root = client, server.base, root
    machine = Tree()
    (root / "f1").write_bytes(b"unknown to the model")
    with pytest.raises(AssertionError):
        machine.put_file("f1", b"x", "none")
