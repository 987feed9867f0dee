"""The "libcurl on a gevent hub" reference of ``throughput.py``: what gdl's download path would cost on libcurl.

gdl downloads from greenlets on one gevent hub. This loop keeps that shape
with none of gdl's work around the download: ``--parallel`` greenlets
(16) each take the next URL, stream its body into a file of ``--out`` named
after the URL's position in the list (no fsync, as aria2c and
``requests_loop.py``) and wait for the transfer to end; the transfers run in
one libcurl multi handle (pycurl) whose sockets and timer are gevent
watchers on the hub (gdl's own, :class:`gdl.http.curl.HubMulti`, with
none of the rest of gdl's curl engine), so libcurl parses HTTP in C while
the greenlets wait. Any failure (a libcurl error, a status other
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

from gdl.http.curl import hub_multi  # noqa: E402


class Transfer:
    """One handle's run in gdl's hub-driven multi (:class:`gdl.http.curl.HubMulti`), without the rest of
    gdl's curl engine: ``perform`` blocks only its greenlet."""

    def __init__(self, handle: pycurl.Curl) -> None:
        self.handle = handle
        self.running = False
        self.done = AsyncResult()

    def perform(self) -> None:
        """Run the transfer; raises OSError with libcurl's message when it fails."""
        self.running = True
        hub_multi().add(self)
        self.done.get()

    def finished(self, code: int, message: str) -> None:
        self.running = False
        if code:
            self.done.set_exception(OSError(message))
        else:
            self.done.set(None)


def main(argv: list[str] | None = None) -> int:
    args, urls = loops.parse(__doc__, "parallel", argv)
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
                Transfer(handle).perform()
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
