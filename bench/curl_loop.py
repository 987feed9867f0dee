"""The "libcurl on a gevent hub" reference of ``throughput.py``: what gdl's download path would cost on libcurl.

gdl downloads with ``requests`` from greenlets on one gevent hub. This loop
keeps that shape and swaps only the HTTP client: ``--parallel`` greenlets
(16) each take the next URL, stream its body into a file of ``--out`` named
after the URL's position in the list (no fsync, as aria2c and
``requests_loop.py``) and wait for the transfer to end; the transfers run in
one libcurl multi handle (pycurl) whose sockets and timer are gevent
watchers on the hub, so libcurl parses HTTP in C while the greenlets wait as
they do on a ``requests`` call. Any failure (a libcurl error, a status other
than 200) ends the run with status 1.

    pip install pycurl
    python bench/curl_loop.py --urls urls.txt --out DIR [--parallel 16]

Prints one JSON object on stdout, as ``requests_loop.py`` does: ``seconds``
(wall time of the downloads, after the imports and before the exit),
``files``, ``bytes`` and ``max_rss_kib``. The CPU time is left to the caller.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
import loops  # noqa: E402
import pycurl  # noqa: E402
from gevent.event import AsyncResult  # noqa: E402

READ, WRITE = 1, 2  # libev's event bits, as gevent's io watchers take and pass them


class HubMulti:
    """A libcurl multi handle driven by the gevent hub: ``perform`` blocks only its greenlet."""

    def __init__(self) -> None:
        self.loop = gevent.get_hub().loop
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._watch_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._set_timer)
        self.watchers: dict[int, object] = {}
        self.timer = None
        self.waiting: dict[int, AsyncResult] = {}

    def perform(self, handle: pycurl.Curl) -> None:
        """Run ``handle``'s transfer; raises OSError with libcurl's message when it fails."""
        done = AsyncResult()
        self.waiting[id(handle)] = done
        self.multi.add_handle(handle)
        done.get()

    # libcurl's callbacks, and the watchers' (all run in the hub: none may block)

    def _watch_socket(self, what: int, fd: int, multi: object, data: object) -> None:
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
            self.timer.start(self._act, pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, mask: int) -> None:
        while self.multi.socket_action(fd, mask)[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, succeeded, failed = self.multi.info_read()
            for handle in succeeded:
                self.multi.remove_handle(handle)
                self.waiting.pop(id(handle)).set(None)
            for handle, _errno, message in failed:
                self.multi.remove_handle(handle)
                self.waiting.pop(id(handle)).set_exception(OSError(message))
            if not queued:
                break


def main(argv: list[str] | None = None) -> int:
    args, urls = loops.parse(__doc__, "parallel", argv)
    multi = HubMulti()
    handles = []  # one per greenlet, reused: libcurl keeps their connections alive
    for _ in range(args.parallel):
        handle = pycurl.Curl()
        handle.setopt(pycurl.NOSIGNAL, 1)
        handles.append(handle)
    errors: list[str] = []
    total = 0

    def fetch(index: int, url: str) -> None:
        nonlocal total
        handle = handles.pop()
        try:
            with open(args.out / str(index), "wb") as out:
                handle.setopt(pycurl.URL, url)
                handle.setopt(pycurl.WRITEDATA, out)
                multi.perform(handle)
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            if status != 200:
                errors.append(f"{url}: {status}")
            total += int(handle.getinfo(pycurl.SIZE_DOWNLOAD_T))
        except OSError as exc:
            errors.append(f"{url}: {exc}")
        finally:
            handles.append(handle)

    started = time.perf_counter()
    pool = gevent.pool.Pool(args.parallel)
    for index, url in enumerate(urls):
        pool.spawn(fetch, index, url)
    pool.join()
    return loops.report("curl_loop", time.perf_counter() - started, len(urls), total, errors)


if __name__ == "__main__":
    sys.exit(main())
