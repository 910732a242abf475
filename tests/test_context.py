"""The server context: aiocoap's own, with request tasks named without formatting the request."""

from __future__ import annotations

import argparse

import aiocoap
from aiocoap.numbers import codes

from coapfs.config import Config
from coapfs.protocol.resource import FileService
from coapfs.transport import context

from support.ports import free_udp_port


def test_context_renders_with_the_cheap_task_name(client, tmp_path):
    (tmp_path / "f.txt").write_text("via the tuned context")
    site = FileService(Config(root=tmp_path).service)
    port = free_udp_port()
    ns = argparse.Namespace(
        bind=("127.0.0.1", port), credentials=None, tls_server_certificate=None,
        tls_server_key=None,
    )  # fmt: skip
    guards = context.WireGuards(Config().amplification, Config().deduplication)
    ctx = client.run(context.server_context(site, ns, guards))
    try:
        assert ctx.render_to_pipe.__func__ is context._render_to_pipe
        r = client.get(f"coap://127.0.0.1:{port}/f.txt")
        assert r.code == codes.CONTENT and r.payload == b"via the tuned context"
        bad = client.request(
            aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{port}/f.txt/")
        )
        assert bad.code == codes.BAD_REQUEST
    finally:
        client.run(ctx.shutdown())
        site.close()
