"""What the tests share, one home per concern.

- `repo`: where the checkout is; the environment a child process gets (this checkout's coapfs
  first, none of systemd's service variables).
- `tools`: CI or not, and what a missing tool means (a failure under CI, a skip elsewhere);
  libcoap's coap-client.
- `ports`: free loopback UDP ports, and whether one is bound.
- `polling`: `wait_until`, the one way a test waits for a condition (and its async twin).
- `client`: a synchronous aiocoap client with `get`, `put`, `delete`.
- `observer`: an observation that records every notification.
- `notify`: a NOTIFY_SOCKET to listen on, as systemd does.
- `server`: `python -m coapfs` in its own process (`Server`), and `Servers`, which starts and
  checks them for a fixture.
- `files`: what a test checks on disk (upload spool files left behind).
- `inprocess`: a server in the test's own process, whose state can be read on its loop.
- `raw`: a server spoken to with hand-made datagrams (the benchmark's CoAP codec).
- `system`: the booted Debian 13 container with the package installed, for the system tests.
- `namespace`: a network and mount namespace of the test's own, whose keeper runs commands in it
  and kills what they started.
- `gluster`: a real GlusterFS replica-2 volume in such a namespace, mounted twice with FUSE.
"""
