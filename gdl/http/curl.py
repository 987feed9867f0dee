"""The curl engine: libcurl (pycurl) driven by the gevent hub.

One ``CurlMulti`` per hub (:class:`HubMulti`) runs every transfer of the
process. libcurl tells it which sockets to watch (``M_SOCKETFUNCTION``) and
when to wake it (``M_TIMERFUNCTION``); those become the hub's own io and
timer watchers, so libcurl parses HTTP in C while each greenlet waits
cooperatively on its own transfer, as it would on a socket. The multi holds
the connection cache: a connection kept alive by one exchange serves the
next one to the same host (and proxy), whichever engine instance sent it.

libcurl's callbacks run inside the hub (in ``socket_action``): they never
block or switch; they store what arrived and set the transfer's event. The
greenlet that reads the body takes what is buffered; past
:data:`HIGH_WATER` buffered bytes the write callback pauses the transfer
(``WRITEFUNC_PAUSE``) and the reader resumes it when it has caught up, so a
slow disk never makes a body pile up in memory.

Hygiene: no redirect followed (``FOLLOWLOCATION`` off), http and https only
(``PROTOCOLS``), no content decoding, no proxy from the environment, TLS
verified against the engine's CA bundle, HTTP/1.1. With a guard, the host
(the proxy's, when there is one) is resolved by the guard and the allowed
addresses are pinned with ``CURLOPT_RESOLVE``; every socket libcurl opens
goes through ``OPENSOCKETFUNCTION``, which refuses an address the guard
refuses, so libcurl never connects to one, whatever it resolved.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import pycurl

from gdl.errors import BlockedAddress, DownloadError, InvalidURL
from gdl.http import failures
from gdl.http.base import CHUNK_SIZE, Engine, Exchange, Headers, Response
from gdl.http.failures import Peer
from gdl.netguard import literal_address

log = logging.getLogger(__name__)

READ, WRITE = 1, 2  # libev's event bits, as gevent's io watchers take and pass them
# Bytes a transfer may hold that its reader has not taken; past this it is paused.
HIGH_WATER = 256 * 1024
# The most libcurl reads from a socket per write callback (CURLOPT_BUFFERSIZE; its
# default is 16 KiB). Each callback is a trip through Python. Since libcurl 8.7 (pycurl's
# wheels bring 8.23) that buffer is one per multi handle, not per transfer, so a bigger
# one costs no memory per download.
RECEIVE_BUFFER = 256 * 1024
# libcurl's own deadline comes this long after the exchange's: the caller's
# (a gevent.Timeout over the whole download) speaks first.
BACKSTOP_MS = 1000
# How libcurl (8.x, then 7.x) introduces OpenSSL's verification error: "SSL certificate
# OpenSSL verify result: self-signed certificate (18)", "SSL certificate problem: ...".
CHAIN_PROBLEM = ("verify result: ", "SSL certificate problem: ")
SUPPRESS_CONNECT_HEADERS = 265  # CURLOPT_SUPPRESS_CONNECT_HEADERS, which pycurl does not name
IDLE_CONNECTIONS = 1000  # the most idle connections the process's multi keeps, all hosts together

# libcurl's TLS results (libcurl-errors(3)): SSL_CONNECT_ERROR 35, PEER_FAILED_VERIFICATION 60,
# SSL_ENGINE_* 53 54 66, SSL_CERTPROBLEM 58, SSL_CIPHER 59, USE_SSL_FAILED 64, SSL_CACERT_BADFILE 77,
# SSL_SHUTDOWN_FAILED 80, SSL_CRL_BADFILE 82, SSL_ISSUER_ERROR 83, SSL_PINNEDPUBKEYNOTMATCH 90,
# SSL_INVALIDCERTSTATUS 91, SSL_CLIENTCERT 98.
_TLS_ERRORS = frozenset({35, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98})
_DROPPED = frozenset({pycurl.E_GOT_NOTHING, pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR})
# Headers libcurl adds unless told not to: gdl sends exactly what it is given.
_SUPPRESSED = ("Accept", "Expect", "Content-Type")


def libcurl_version() -> str:
    return str(pycurl.version_info()[1])


class CurlEngine(Engine):
    """The engine on libcurl: see the module's docstring."""

    name = "curl"

    def send(self, exchange: Exchange) -> Response:
        peer = Peer.of(exchange)
        transfer = _Transfer(hub_multi(), exchange, peer, self)
        try:
            try:
                self._configure(transfer)
            except (UnicodeError, pycurl.error) as exc:  # libcurl takes ASCII URLs only (see base.wire_url)
                raise InvalidURL(f"invalid URL {exchange.url!r}: {exc}") from exc
            transfer.start()
            transfer.wait_for_head()
        except BaseException:
            transfer.release()
            raise
        if not transfer.head_done:
            error = transfer.error()
            transfer.release()
            raise error from transfer.cause()
        return CurlResponse(transfer)

    def close(self) -> None:
        pass  # the connections are the process's multi's, kept for the next exchange whoever sends it

    def _configure(self, transfer: _Transfer) -> None:
        exchange, handle = transfer.exchange, transfer.handle
        handle.setopt(pycurl.URL, exchange.url)
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        handle.setopt(pycurl.FOLLOWLOCATION, 0)
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.HTTP_CONTENT_DECODING, 0)
        handle.setopt(pycurl.CAINFO, self.ca_bundle)
        handle.setopt(pycurl.PROXY_CAINFO, self.ca_bundle)  # an https:// proxy is verified alike
        handle.setopt(pycurl.PROXY, exchange.proxy)  # "" also keeps http_proxy & co. from the environment out
        handle.setopt(SUPPRESS_CONNECT_HEADERS, 1)
        handle.setopt(pycurl.CONNECTTIMEOUT_MS, int(exchange.connect_timeout * 1000))
        handle.setopt(pycurl.TIMEOUT_MS, int(exchange.timeout * 1000) + BACKSTOP_MS)
        handle.setopt(pycurl.HTTPHEADER, _header_lines(exchange.headers))
        handle.setopt(pycurl.HEADERFUNCTION, transfer.on_header)
        handle.setopt(pycurl.WRITEFUNCTION, transfer.on_write)
        handle.setopt(pycurl.BUFFERSIZE, RECEIVE_BUFFER)
        _set_method(handle, exchange)
        if self.guard is not None:
            self._guard(transfer)

    def _guard(self, transfer: _Transfer) -> None:
        """Resolve the peer through the guard, pin what it allowed, check every socket opened."""
        assert self.guard is not None
        peer = transfer.peer
        try:
            allowed = self.guard.resolve(peer.host, peer.port, role=peer.role)
        except OSError as exc:
            raise failures.cannot_resolve(peer) from exc
        if literal_address(peer.host) is None:
            addresses = ",".join(f"[{ip}]" if ":" in ip else ip for ip in allowed)
            transfer.handle.setopt(pycurl.RESOLVE, [f"{peer.host}:{peer.port}:{addresses}"])
        transfer.handle.setopt(pycurl.OPENSOCKETFUNCTION, transfer.open_socket)


class CurlResponse(Response):
    def __init__(self, transfer: _Transfer):
        self.transfer = transfer
        self.status = transfer.status
        self.reason = transfer.reason
        self.headers = Headers(transfer.header_pairs)
        self.url = transfer.exchange.url

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        transfer = self.transfer
        while True:
            if transfer.buffer:
                yield transfer.take()
            elif transfer.done:
                if transfer.code:
                    raise transfer.body_error() from transfer.cause()
                return
            else:
                transfer.wait()

    def close(self) -> None:
        self.transfer.release()


class _Transfer:
    """One exchange in the multi: libcurl's callbacks fill it, the reading greenlet empties it."""

    def __init__(self, multi: HubMulti, exchange: Exchange, peer: Peer, engine: CurlEngine):
        self.multi = multi
        self.handle = multi.take_handle()
        self.exchange = exchange
        self.peer = peer
        self.guard = engine.guard
        self.event = gevent.event.Event()
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.received = 0
        self.paused = False
        self.running = False
        self.released = False
        self.status = 0
        self.reason = ""
        self.header_pairs: list[tuple[str, str]] = []
        self.head_done = False
        self.done = False
        self.code = 0  # libcurl's result, once done
        self.message = ""
        self.info: dict[str, Any] = {}
        self.blocked: BlockedAddress | None = None
        self.sockets: list[socket.socket] = []  # opened for libcurl (which uses duplicates); closed at the end

    # ------------------------------------------------------------------ the reading greenlet

    def start(self) -> None:
        self.running = True
        self.multi.add(self)

    def wait(self) -> None:
        self.event.wait()
        self.event.clear()

    def wait_for_head(self) -> None:
        while not (self.head_done or self.done):
            self.wait()

    def take(self) -> bytes:
        data = self.buffer[0] if len(self.buffer) == 1 else b"".join(self.buffer)
        self.buffer.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.handle.pause(pycurl.PAUSE_CONT)  # may deliver the held data at once, into the emptied buffer
        return data

    def release(self) -> None:
        """End the transfer (a running one drops its connection) and give the handle back."""
        if self.released:
            return
        self.released = True
        if self.running:
            self.multi.remove(self)
        for sock in self.sockets:
            sock.close()
        self.buffer.clear()
        self.multi.give_handle(self.handle)

    # ------------------------------------------------------------------ libcurl's callbacks (in the hub)

    def on_header(self, line: bytes) -> None:
        if self.head_done:
            return  # trailers
        if line.startswith(b"HTTP/"):
            _version, _, rest = line.decode("latin-1").strip().partition(" ")
            code, _, reason = rest.partition(" ")
            self.status = int(code) if code.isdigit() else 0
            self.reason = reason
            self.header_pairs = []
        elif line in (b"\r\n", b"\n"):
            if self.status >= 200:  # a 1xx head is followed by the real one
                self.head_done = True
                self.event.set()
        elif line[:1] in (b" ", b"\t") and self.header_pairs:
            name, value = self.header_pairs[-1]
            self.header_pairs[-1] = (name, f"{value} {line.decode('latin-1').strip()}")
        else:
            name, _, value = line.decode("latin-1").partition(":")
            self.header_pairs.append((name.strip(), value.strip()))

    def on_write(self, data: bytes) -> int | None:
        if self.buffered >= HIGH_WATER:
            self.paused = True
            return pycurl.WRITEFUNC_PAUSE  # libcurl keeps this chunk and gives it again once resumed
        if not self.head_done:
            self.head_done = True  # a head without its blank line (HTTP/0.9-like): take it as it is
        self.buffer.append(data)
        self.buffered += len(data)
        self.received += len(data)
        self.event.set()
        return None

    def open_socket(self, _purpose: int, address: Any) -> Any:
        ip = str(address.addr[0])
        assert self.guard is not None
        try:
            self.guard.check_address(self.peer.host, ip, role=self.peer.role)
        except BlockedAddress as exc:
            self.blocked = self.blocked or exc
            return pycurl.SOCKET_BAD
        try:
            sock = socket.socket(address.family, address.socktype, address.protocol)
        except OSError:
            return pycurl.SOCKET_BAD  # out of descriptors, say: libcurl reports it could not connect
        self.sockets.append(sock)  # pycurl hands libcurl a duplicate; this one is closed with the transfer
        return sock

    def finished(self, code: int, message: str) -> None:
        self.running = False
        self.done = True
        self.code = code
        self.message = message
        if code:
            handle = self.handle
            self.info = {"os_errno": handle.getinfo(pycurl.OS_ERRNO),
                         "connected": handle.getinfo(pycurl.CONNECT_TIME) > 0}
        self.event.set()

    # ------------------------------------------------------------------ errors

    def error(self) -> DownloadError:
        """What failed before a response arrived, in the seam's words."""
        code, peer, exchange = self.code, self.peer, self.exchange
        if self.blocked is not None:
            return self.blocked
        if code in (pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY):
            return failures.cannot_resolve(peer)
        if code == pycurl.E_COULDNT_CONNECT:
            os_errno = self.info.get("os_errno", 0)
            if os_errno == errno.ECONNREFUSED:
                return failures.refused(peer)
            return failures.cannot_connect(peer, os_errno)
        if code == pycurl.E_OPERATION_TIMEDOUT:
            if self.info.get("connected"):
                return failures.timed_out(exchange.timeout)
            return failures.timed_out(exchange.connect_timeout, connecting=peer)
        if code in _TLS_ERRORS:
            return self._tls_error()
        if code in (pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_URL_MALFORMAT):
            return InvalidURL(f"invalid URL {exchange.url!r}: {self.message}")
        if code in _DROPPED:
            return failures.dropped(peer)
        return failures.failed(peer, self.message)

    def cause(self) -> pycurl.error:
        """libcurl's own account of the failure, chained under ours."""
        return pycurl.error(self.code, self.message)

    def _tls_error(self) -> DownloadError:
        chain_problem = any(marker in self.message for marker in CHAIN_PROBLEM)
        if self.code == pycurl.E_PEER_FAILED_VERIFICATION and not chain_problem:
            # The chain was good, the name was not: libcurl checks it after OpenSSL's
            # verification (and reports no X509 code of its own for it). Only the
            # words depend on the text; the type is TLSError either way.
            return failures.certificate_not_valid_for(self.exchange.url)
        return failures.tls_failed(_openssl_words(self.message))

    def body_error(self) -> DownloadError:
        """What cut the body short, in the seam's words."""
        if self.code == pycurl.E_OPERATION_TIMEDOUT:
            return failures.timed_out(self.exchange.timeout)
        if self.code == pycurl.E_PARTIAL_FILE:
            return failures.cut_short(self.received, failures.ENDED_EARLY, self.status)
        return failures.cut_short(self.received, self.info.get("os_errno") or self.message, self.status)


def _openssl_words(message: str) -> str:
    """OpenSSL's reason in a libcurl TLS message: "... verify result: certificate has expired (10)",
    "OpenSSL/3.0: error:0A00010B:SSL routines::wrong version number" -> the reason alone."""
    for marker in (*CHAIN_PROBLEM, "::"):
        if marker in message:
            return re.sub(r" \(\d+\)$", "", message.rsplit(marker, 1)[1].strip())
    return message


def _header_lines(headers: list[tuple[str, str]]) -> list[bytes]:
    """libcurl's header lines; values in latin-1 as http.client sends them (UTF-8 beyond it)."""
    lines = [f"{name}: {value}" if value else f"{name};" for name, value in headers]
    given = {name.lower() for name, _ in headers}
    lines += [f"{name}:" for name in _SUPPRESSED if name.lower() not in given]
    return [_latin1(line) for line in lines]


def _latin1(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _set_method(handle: pycurl.Curl, exchange: Exchange) -> None:
    method = exchange.method.upper()
    if exchange.body is not None:
        handle.setopt(pycurl.POSTFIELDS, exchange.body)
        if method != "POST":
            handle.setopt(pycurl.CUSTOMREQUEST, method)
    elif method == "HEAD":
        handle.setopt(pycurl.NOBODY, 1)
    elif method != "GET":
        handle.setopt(pycurl.CUSTOMREQUEST, method)


class HubMulti:
    """The hub's one CurlMulti: libcurl's sockets and timer as hub watchers.

    It runs transfers: objects with a ``handle`` (a configured ``pycurl.Curl``),
    a ``running`` flag and ``finished(code, message)``, called in the hub when
    libcurl is done with it (code 0: success). bench/curl_loop.py drives it too.
    """

    def __init__(self) -> None:
        self.loop = gevent.get_hub().loop
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._watch_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._set_timer)
        self.multi.setopt(pycurl.M_MAXCONNECTS, IDLE_CONNECTIONS)
        self.watchers: dict[int, Any] = {}
        self.timer: Any = None
        self.transfers: dict[pycurl.Curl, _Transfer] = {}
        self.idle_handles: list[pycurl.Curl] = []

    def take_handle(self) -> pycurl.Curl:
        return self.idle_handles.pop() if self.idle_handles else pycurl.Curl()

    def give_handle(self, handle: pycurl.Curl) -> None:
        handle.reset()  # options and callbacks of the last exchange go; the connection cache is the multi's
        self.idle_handles.append(handle)

    def add(self, transfer: _Transfer) -> None:
        self.transfers[transfer.handle] = transfer
        self.multi.add_handle(transfer.handle)

    def remove(self, transfer: _Transfer) -> None:
        if self.transfers.pop(transfer.handle, None) is not None:
            self.multi.remove_handle(transfer.handle)
        transfer.running = False

    # ------------------------------------------------------------------ libcurl's callbacks and the watchers'

    def _watch_socket(self, what: int, fd: int, _multi: object, _data: object) -> None:
        old = self.watchers.pop(fd, None)
        if old is not None:
            old.stop()
            old.close()
        if what == pycurl.POLL_REMOVE:
            return
        events = (READ if what & pycurl.POLL_IN else 0) | (WRITE if what & pycurl.POLL_OUT else 0)
        watcher = self.loop.io(fd, events)
        watcher.start(self._socket_ready, fd, pass_events=True)
        self.watchers[fd] = watcher

    def _socket_ready(self, revents: int, fd: int) -> None:
        mask = (pycurl.CSELECT_IN if revents & READ else 0) | (pycurl.CSELECT_OUT if revents & WRITE else 0)
        self._act(fd, mask)

    def _set_timer(self, ms: int) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None
        if ms >= 0:
            self.timer = self.loop.timer(ms / 1000)
            self.timer.start(self._timer_fired)

    def _timer_fired(self) -> None:
        self._act(pycurl.SOCKET_TIMEOUT, 0)
        # libcurl calls the timer function only when its deadline changes; if the
        # hub's clock ran a little ahead of libcurl's, nothing was due yet and no
        # new deadline would come: ask again.
        if self.timer is None or not self.timer.active:
            ms = self.multi.timeout()
            if ms >= 0:
                self._set_timer(ms)

    def _act(self, fd: int, mask: int) -> None:
        try:
            while self.multi.socket_action(fd, mask)[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
        except pycurl.error as exc:  # the multi itself failed: no transfer is to blame
            log.error("curl: socket_action failed: %s", exc)
        self._collect()

    def _collect(self) -> None:
        while True:
            queued, succeeded, failures = self.multi.info_read()
            for handle in succeeded:
                self._finish(handle, 0, "")
            for handle, code, message in failures:
                self._finish(handle, code, message)
            if not queued:
                return

    def _finish(self, handle: pycurl.Curl, code: int, message: str) -> None:
        transfer = self.transfers.pop(handle, None)
        self.multi.remove_handle(handle)
        if transfer is not None:
            transfer.finished(code, message)


_MULTIS: weakref.WeakKeyDictionary[Any, HubMulti] = weakref.WeakKeyDictionary()


def hub_multi() -> HubMulti:
    """This hub's multi, made on first use."""
    hub = gevent.get_hub()
    multi = _MULTIS.get(hub)
    if multi is None:
        multi = _MULTIS[hub] = HubMulti()
    return multi
