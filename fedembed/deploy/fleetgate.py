"""The coordinator's public port: Flower's Fleet API and nothing else.

Flower 1.42's SuperLink serves all of its APIs from one HTTP server on one ``--host`` /
``--port``: ``flower-superlink`` (``flwr.superlink.cli.flower_superlink.flower_superlink``)
ends in a single ``uvicorn.run`` of the FastAPI app built by
``flwr.superlink.main.create_app``, which mounts the Fleet API (SuperNodes) under
``/v1/fleet``, the Control API (the ``flwr`` CLI: nodes, keys, runs; no authentication in
the open-source SuperLink) under ``/v1/control`` and the Runtime API (SuperExec and
ServerApp) under ``/v1/runtime``. ``--fleet-api-address`` and ``--control-api-address``
are deprecated and bind nothing unless Flower's internal legacy-gRPC switches are set.
The APIs cannot be put on different addresses.

So ``fedembed server`` runs the SuperLink on 127.0.0.1 only and puts this gate on the
public host and port. The gate terminates TLS with the coordinator's certificate (the
organisations verify it with ``ca.crt`` as before) and forwards a request to the
SuperLink, over TLS on loopback, only if it is a ``POST`` whose path is exactly one of the
routes of Flower's Fleet router (read from the installed Flower, ``/v1/fleet/...``). The
upstream request is built from that route, never from the client's raw path or query,
so no path trick reaches another router. Every other request is answered ``403`` by the
gate itself and never reaches the SuperLink. SuperNode authentication is untouched:
Flower's signed headers travel through, and the SuperLink checks them as before.

With a wake-up directory (``--wakeup-dir``, :mod:`fedembed.apps.wakeup`), the gate also
takes the polling out of a round trip. A SuperNode's ``pull-messages`` that finds nothing
is held open for up to :data:`HOLD_SECONDS` (well under the SuperNode's 30 s request
timeout) and asked again the moment the ServerApp says it has pushed messages (and every
:data:`RECHECK_SECONDS` regardless): the SuperNode gets its message as soon as it is there
instead of at its next poll, and an idle SuperNode costs one request every
:data:`HOLD_SECONDS` instead of several a second. When a SuperNode has pushed a reply whole
(its ``push-messages`` needed no objects, or it comes back for its next message after
pushing them), the gate wakes the ServerApp, which then pulls the reply instead of polling
for it. The requests themselves are forwarded as before; a request the gate cannot read
is forwarded unwatched. A stock SuperNode works unchanged against a holding gate.

Run it as ``python -m fedembed.deploy.fleetgate`` (see :func:`main`); :class:`FleetGate` is the
ASGI application.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("fedembed.deploy.fleetgate")  # also under `python -m`

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

REFUSAL = ("refused by the fedembed fleet gate: this port serves only the Flower Fleet API "
           "(SuperNodes); the Control and Runtime APIs are not reachable from the network")
"""``detail`` of every refusal (the ``flwr`` CLI prints it)."""

PULL_MESSAGES = "/v1/fleet/pull-messages"
PUSH_MESSAGES = "/v1/fleet/push-messages"

HOLD_SECONDS = 10.0
"""Longest a SuperNode's empty ``pull-messages`` is held open (Flower's SuperNode gives a request 30 s)."""

RECHECK_SECONDS = 1.0
"""A held ``pull-messages`` asks the SuperLink again at least this often (a wake-up may be lost or never sent)."""

KEEP_ALIVE_SECONDS = 60
"""Idle seconds a connection is kept open, to the SuperNodes and to the SuperLink (uvicorn's and httpx's default: 5).

A SuperNode whose poll is held keeps its other connections idle meanwhile; closed after 5 s,
each was a new TLS handshake the moment its next message came (tenths of a second under load)."""

PUSH_OBJECT = "/v1/fleet/push-object"

BODY_LIMIT = 16 << 20
"""Longest request body the gate forwards (Flower pushes arrays in chunks of 5 MiB; every other
Fleet request is headers and object ids). A longer one is refused with ``413`` before any of it
reaches the SuperLink, which reads a whole body into memory before it checks who sent it: one
1 GB request from anyone cost it 2 GB."""

SUPERLINK_NODE = 1
"""Flower's node id of the SuperLink (``flwr.common.constant.SUPERLINK_NODE_ID``): where replies go."""

REFUSAL_HEADER = b"x-fedembed-gate"
"""Response header marking an answer the gate gave itself: ``refused`` (403), or
``unavailable`` (503) when the SuperLink cannot be reached."""

_DROPPED_HEADERS = frozenset({
    # hop-by-hop (RFC 9110 7.6.1): they describe one connection, not the request
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
    # set by the client library for the upstream connection
    b"host",
    # who the peer is: the gate says so itself; the SuperLink's uvicorn trusts these from 127.0.0.1
    b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip",
})


def fleet_paths() -> frozenset[str]:
    """The paths of the installed Flower's Fleet API routes (all ``POST``).

    Raises
    ------
    RuntimeError
        If Flower's Fleet router is empty or has a route outside ``/v1/fleet/`` (a Flower
        version this gate was not written for).
    """
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(r.path for r in router.routes if "POST" in (getattr(r, "methods", None) or ()))
    if not paths or not all(p.startswith("/v1/fleet/") for p in paths):
        raise RuntimeError(f"unexpected Flower Fleet API routes {sorted(paths)}: this fedembed does not know "
                           "how to gate this Flower version")
    return paths


class FleetGate:
    """ASGI app: forward Fleet API calls to the SuperLink, refuse everything else.

    Parameters
    ----------
    upstream : str
        Base URL of the SuperLink, e.g. ``https://127.0.0.1:41234`` (loopback).
    verify : ssl.SSLContext or bool
        How to verify the SuperLink's certificate (a context holding the coordinator's CA),
        or ``False`` for a plain-HTTP (``--insecure``) SuperLink.
    paths : frozenset of str, optional
        The paths let through; default :func:`fleet_paths`.
    timeout : float
        Seconds to wait for the SuperLink to connect or send data; a SuperNode's own
        request timeout is shorter.
    wakeup_dir : Path or None
        The wake-up directory shared with the ServerApp (:mod:`fedembed.apps.wakeup`):
        hold empty polls and wake the ServerApp on replies; None forwards every request
        as it comes.
    hold, recheck : float
        See :data:`HOLD_SECONDS`, :data:`RECHECK_SECONDS`.
    max_reply_bytes : int or None
        Most bytes of objects a node may push for one reply (the coordinator's
        ``--max-message-bytes``): further ``push-object`` calls are refused with ``413``,
        so an oversized reply never reaches the SuperLink whole. None: no budget.
    """

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool, paths: frozenset[str] | None = None,
                 timeout: float = 300.0, wakeup_dir: Path | None = None, hold: float = HOLD_SECONDS,
                 recheck: float = RECHECK_SECONDS, max_reply_bytes: int | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.paths = fleet_paths() if paths is None else frozenset(paths)
        self.wakeup_dir, self.hold, self.recheck = wakeup_dir, hold, recheck
        self.wakeups: Any = None  # the gate's end (fedembed.apps.wakeup.Wakeups), bound at startup
        self._pushed = asyncio.Event()  # set (and replaced) whenever the ServerApp has pushed messages
        self._replying: set[int] = set()  # nodes that pushed a reply header and are pushing its objects
        self.closing = False  # shutting down: held polls are answered at once
        self._generation = 0  # how many times the ServerApp said it pushed messages
        self._asked_at: dict[int, int] = {}  # node -> generation when the SuperLink was last asked for it
        self.max_reply_bytes = max_reply_bytes
        self._pushed_bytes: dict[int, int] = {}  # node -> object bytes accepted since its last push-messages
        # one upstream connection per concurrent call, as if the SuperNodes dialled the SuperLink
        self.client = httpx.AsyncClient(
            base_url=self.upstream, verify=verify, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=KEEP_ALIVE_SECONDS),
            follow_redirects=False,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are switched off in the server; nothing else is served
        if scope["method"] != "POST" or scope["path"] not in self.paths:
            peer = scope.get("client") or ("?", 0)
            log.warning("refused %s %.200r from %s:%s", scope["method"], scope.get("raw_path", b""), peer[0], peer[1])
            await _answer(send, 403, REFUSAL)
            return
        try:  # read whole, within the limit, before anything reaches the SuperLink
            chunks, whole = await _read_body(receive, BODY_LIMIT)
        except _ClientGone:
            return
        peer = scope.get("client") or ("?", 0)
        if not whole:
            log.warning("refused %s from %s:%s: a body of more than %d bytes", scope["path"], peer[0], peer[1],
                        BODY_LIMIT)
            await _answer(send, 413, f"refused by the fedembed fleet gate: request bodies are limited to {BODY_LIMIT} "
                                     "bytes")
            return
        body = b"".join(chunks)
        node, fault = self._inspect(scope["path"], body)
        if fault is not None:
            log.warning("refused %s from %s:%s: %s", scope["path"], peer[0], peer[1], fault)
            await _answer(send, 403 if scope["path"] == PUSH_MESSAGES else 413,
                          f"refused by the fedembed fleet gate: {fault}")
            return
        if self.wakeups is not None and scope["path"] in (PULL_MESSAGES, PUSH_MESSAGES):
            await self._forward_watched(scope["path"], scope, body, node, receive, send)
        else:
            await self._forward(scope["path"], scope, send, body, node)

    def _inspect(self, path: str, body: bytes) -> tuple[int | None, str | None]:
        """The node a request it has read names (None: one the gate does not read), and why it is refused.

        The refusal is None for a request to forward.

        A SuperNode pushes only **replies**, its own, to the SuperLink: Flower's Fleet API
        stores any message a node pushes without ``reply_to`` as an instruction, from "the
        SuperLink", to any node it names. One organisation could thus send another a
        ``train`` message of its making (a round far ahead, which locked the other out of
        the run), or hand the ServerApp messages it never sent for. And a node's objects for
        one reply are counted against ``max_reply_bytes``.
        """
        if path == PUSH_MESSAGES:
            from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611

            try:
                request = PushMessagesRequest.FromString(body)
            except Exception:  # noqa: BLE001 - not a request Flower could read either
                return None, "push-messages: not a Flower PushMessagesRequest"
            node = int(request.node.node_id)
            for message in request.messages_list:
                meta = message.metadata
                if not meta.reply_to_message_id or int(meta.src_node_id) != node or int(meta.dst_node_id) != SUPERLINK_NODE:
                    return node, (f"push-messages of node {node}: a SuperNode pushes only its own replies to the "
                                  f"SuperLink (got src {meta.src_node_id}, dst {meta.dst_node_id}, reply_to "
                                  f"{meta.reply_to_message_id[:16]!r})")
            return node, None
        if path == PULL_MESSAGES:  # the node whose poll may be held
            return (_node_id(path, body) if self.wakeups is not None else None), None
        if path == PUSH_OBJECT and self.max_reply_bytes is not None:
            node = _object_node(body)
            if node is not None:
                if self._pushed_bytes.get(node, 0) + len(body) > self.max_reply_bytes:
                    return node, (f"push-object of node {node}: its reply is over {self.max_reply_bytes} bytes "
                                  "(the coordinator's --max-message-bytes)")
                # reserved now, before it is forwarded (objects pushed in parallel are each counted against the
                # others), and given back if the SuperLink does not take it (:meth:`_count`)
                self._pushed_bytes[node] = self._pushed_bytes.get(node, 0) + len(body)
            return node, None
        return None, None

    def _count(self, path: str, node: int | None, size: int, status: int) -> None:
        """Settle a node's reply budget: a new push-messages starts it again; an object not taken is given back."""
        if self.max_reply_bytes is None or node is None:
            return
        if path == PUSH_MESSAGES and status == 200:
            self._pushed_bytes[node] = 0
        elif path == PUSH_OBJECT and status != 200 and node in self._pushed_bytes:
            self._pushed_bytes[node] = max(0, self._pushed_bytes[node] - size)

    @staticmethod
    def _headers(scope: Scope) -> list[tuple[bytes, bytes]]:
        peer = scope.get("client") or ("", 0)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROPPED_HEADERS]
        if peer[0]:
            headers.append((b"x-forwarded-for", str(peer[0]).encode("latin-1")))
        return headers

    async def _forward(self, path: str, scope: Scope, send: Send, body: bytes, node: int | None) -> None:
        headers = self._headers(scope)
        # ``path`` is the matched route, one of ``self.paths``; the query string is dropped
        request = self.client.build_request("POST", path, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except _ClientGone:
            self._count(path, node, len(body), 0)
            return
        except httpx.TransportError as exc:
            self._count(path, node, len(body), 503)
            log.error("SuperLink at %s unreachable for %s: %s", self.upstream, path, exc)
            await _answer(send, 503, "SuperLink unavailable")
            return
        self._count(path, node, len(body), response.status_code)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _DROPPED_HEADERS]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _forward_watched(self, path: str, scope: Scope, body: bytes, node: int | None, receive: Receive,
                               send: Send) -> None:
        """Forward a ``pull-messages`` (held while empty) or ``push-messages`` (noted), as :meth:`_forward` does."""
        if path == PULL_MESSAGES and node is not None and node in self._replying:
            self._replying.discard(node)  # back for its next message: the reply it pushed is all in
            self.wakeups.wake_other()
        headers = self._headers(scope)
        deadline = asyncio.get_running_loop().time() + self.hold
        # nothing pushed since this node last asked: nothing new for it, wait before asking (the
        # ServerApp sends a node one message per push; should one more be waiting, the recheck finds it)
        ask = path != PULL_MESSAGES or node is None or self._asked_at.get(node) != self._generation
        status, response_headers, content = 0, [], b""
        gone = asyncio.ensure_future(receive())  # the request is read: this ends only when the SuperNode hangs up
        try:
            while True:
                pushed = self._pushed  # taken before asking: a push while we ask ends the wait below at once
                if ask:
                    generation = self._generation
                    try:
                        status, response_headers, content = await self._ask(path, headers, body)
                    except httpx.TransportError as exc:
                        log.error("SuperLink at %s unreachable for %s: %s", self.upstream, path, exc)
                        await _answer(send, 503, "SuperLink unavailable")
                        return
                    if path == PUSH_MESSAGES:
                        self._count(path, node, len(body), status)
                        self._note_push(node, status, content)
                        break
                    empty = status == 200 and _no_messages(content)
                    if node is not None and status == 200:
                        self._asked_at[node] = generation
                    if not empty or self.closing or asyncio.get_running_loop().time() >= deadline:
                        break
                ask = True
                left = max(0.0, deadline - asyncio.get_running_loop().time())
                woken = asyncio.ensure_future(pushed.wait())
                done, _ = await asyncio.wait({woken, gone}, timeout=min(self.recheck, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if gone in done:
                    if gone.exception() is not None or gone.result().get("type") == "http.disconnect":
                        return  # nobody to answer: ask no more (a message handed out now would be lost)
                    break
        finally:
            gone.cancel()
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})

    async def _ask(self, path: str, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One request to the SuperLink: its status, headers (hop-by-hop ones dropped) and body (decoded)."""
        response = await self.client.send(self.client.build_request("POST", path, headers=headers, content=body))
        content = response.content
        kept = [(k, v) for k, v in response.headers.raw
                if k.lower() not in _DROPPED_HEADERS and k.lower() not in (b"content-length", b"content-encoding")]
        return response.status_code, [*kept, (b"content-length", str(len(content)).encode())], content

    def _note_push(self, node: int | None, status: int, content: bytes) -> None:
        """After a ``push-messages``: wake the ServerApp now (nothing else to push) or once the objects are in."""
        if node is None or status != 200:
            return
        from flwr.proto.fleet_pb2 import PushMessagesResponse  # pylint: disable=E0611

        try:
            objects = PushMessagesResponse.FromString(content).objects_to_push
        except Exception:  # noqa: BLE001 - not Flower's answer: nothing to note
            return
        if objects:
            self._replying.add(node)
        else:
            self.wakeups.wake_other()

    def release_held(self) -> None:
        """Answer every held poll now, and hold no more (the gate is shutting down)."""
        self.closing = True
        self._pushed.set()

    def _on_wakeup(self) -> None:
        """The ServerApp pushed messages: every held poll asks the SuperLink again."""
        if self.wakeups.drain():
            self._generation += 1
            self._pushed.set()
            self._pushed = asyncio.Event()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                log.info("fleet gate: forwarding %d Fleet API routes to %s, refusing everything else",
                         len(self.paths), self.upstream)
                if self.wakeup_dir is not None:
                    from fedembed.apps.wakeup import Wakeups

                    self.wakeups = Wakeups.gate(self.wakeup_dir)
                    asyncio.get_running_loop().add_reader(self.wakeups.sock.fileno(), self._on_wakeup)
                    log.info("fleet gate: empty polls held up to %.0f s, woken through %s", self.hold,
                             self.wakeups.path)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.wakeups is not None:
                    asyncio.get_running_loop().remove_reader(self.wakeups.sock.fileno())
                    self.wakeups.close()
                    self.wakeups = None
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _ClientGone(Exception):
    """The SuperNode hung up while sending its request."""


async def _read_body(receive: Receive, limit: int) -> tuple[list[bytes], bool]:
    """The request body's chunks, and whether that is all of it (False: it went past ``limit`` bytes; reading stops)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return chunks, False
        if not message.get("more_body", False):
            return chunks, True


def _node_id(path: str, body: bytes) -> int | None:
    """The node id a ``pull-messages`` / ``push-messages`` request names, or None if it is not one."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PushMessagesRequest  # pylint: disable=E0611

    kind = PullMessagesRequest if path == PULL_MESSAGES else PushMessagesRequest
    try:
        return int(kind.FromString(body).node.node_id)
    except Exception:  # noqa: BLE001 - the SuperLink answers a malformed request; the gate only does not watch it
        return None


def _object_node(body: bytes) -> int | None:
    """The node id a ``push-object`` request names, or None if it is not one."""
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611

    try:
        return int(PushObjectRequest.FromString(body).node.node_id)
    except Exception:  # noqa: BLE001 - the SuperLink answers a malformed request
        return None


def _no_messages(content: bytes) -> bool:
    """Whether a ``pull-messages`` answer is Flower's "nothing for you" (anything else is passed on at once)."""
    from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=E0611

    try:
        res = PullMessagesResponse.FromString(content)
    except Exception:  # noqa: BLE001 - not a Flower answer: pass it on
        return False
    return not res.messages_list and not res.HasField("reconnect")


async def _answer(send: Send, status: int, detail: str) -> None:
    """A JSON ``{"detail": ...}`` answer of the gate's own, marked with :data:`REFUSAL_HEADER`."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (REFUSAL_HEADER, b"refused" if status == 403 else b"unavailable")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def upstream_verify(ca_certfile: Path | None) -> ssl.SSLContext | bool:
    """TLS verification of the SuperLink: a context trusting ``ca_certfile``; ``False`` if None (plain HTTP)."""
    if ca_certfile is None:
        return False
    return ssl.create_default_context(cafile=str(ca_certfile))


def serve(host: str, port: int, upstream: str, certfile: Path | None = None, keyfile: Path | None = None,
          ca_certfile: Path | None = None, wakeup_dir: Path | None = None, max_reply_bytes: int | None = None) -> None:
    """Run the gate on ``host:port`` until interrupted.

    Parameters
    ----------
    host, port : str, int
        The public address (where the organisations connect).
    upstream : str
        The SuperLink's loopback base URL (``https://127.0.0.1:<port>``, or ``http://``
        for an insecure trial).
    certfile, keyfile : Path or None
        The coordinator's TLS certificate and key, served to the organisations; both
        None: plain HTTP.
    ca_certfile : Path or None
        CA that signed the SuperLink's certificate (verifies the upstream connection).
    wakeup_dir : Path or None
        The wake-up directory shared with the ServerApp (see :class:`FleetGate`).
    max_reply_bytes : int or None
        See :class:`FleetGate`.
    """
    import uvicorn

    if (certfile is None) != (keyfile is None):
        raise ValueError("give both certfile and keyfile, or neither (plain HTTP)")
    if upstream.startswith("https://") and ca_certfile is None:
        raise ValueError("an https upstream needs ca_certfile to verify the SuperLink's certificate")
    app = FleetGate(upstream, upstream_verify(ca_certfile if upstream.startswith("https://") else None),
                    wakeup_dir=wakeup_dir, max_reply_bytes=max_reply_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, lifespan="on", ws="none", proxy_headers=False, server_header=False,
        access_log=False, log_config=None, timeout_graceful_shutdown=2, timeout_keep_alive=KEEP_ALIVE_SECONDS,
        ssl_certfile=None if certfile is None else str(certfile), ssl_keyfile=None if keyfile is None else str(keyfile),
    )
    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            app.release_held()  # before uvicorn waits for open requests to end
            await super().shutdown(sockets)

    Server(config).run()  # uvicorn's own loop choice: uvloop when installed (its TLS is far cheaper than asyncio's)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedembed.deploy.fleetgate --host H --port P --upstream URL [TLS files]``."""
    p = argparse.ArgumentParser(prog="python -m fedembed.deploy.fleetgate", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", required=True, help="public address to listen on")
    p.add_argument("--port", type=int, required=True, help="public port (the organisations' SuperNodes dial it)")
    p.add_argument("--upstream", required=True, help="the SuperLink on loopback, https://127.0.0.1:PORT")
    p.add_argument("--certfile", type=Path, help="TLS certificate served to the organisations")
    p.add_argument("--keyfile", type=Path, help="its private key")
    p.add_argument("--ca-certfile", type=Path, help="CA that signed the SuperLink's certificate")
    p.add_argument("--wakeup-dir", type=Path,
                   help="wake-up directory shared with the ServerApp: hold empty polls, wake the ServerApp on replies")
    p.add_argument("--max-reply-bytes", type=int,
                   help="most bytes of objects a node may push for one reply (the coordinator's --max-message-bytes)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in ("fedembed", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        serve(args.host, args.port, args.upstream, args.certfile, args.keyfile, args.ca_certfile, args.wakeup_dir,
              args.max_reply_bytes)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
