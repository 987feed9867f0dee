"""The "plain requests loop" reference of ``throughput.py``: download a list of URLs with ``requests``.

``--threads`` threads (16), each with one ``requests.Session`` (keep-alive),
take the next URL from a shared queue and stream its body into a file of
``--out`` named after the URL's position in the list; no fsync, as aria2c.
Any failure (an error, a status other than 200) ends the run with status 1.

    python bench/requests_loop.py --urls urls.txt --out DIR [--threads 16]

Prints one JSON object on stdout: ``seconds`` (wall time of the downloads,
after the imports and before the exit), ``files``, ``bytes`` and
``max_rss_kib`` (this process's peak resident memory). The CPU time is left
to the caller (``getrusage(RUSAGE_CHILDREN)`` once it waited for it).
"""

import queue
import sys
import threading
import time
from pathlib import Path

import loops
import requests

CHUNK = 64 * 1024


def worker(todo: queue.SimpleQueue, outdir: Path, done: list[int], errors: list[str]) -> None:
    """Download from ``todo`` until it is empty, over one session; adds the bytes to ``done``."""
    total = 0
    with requests.Session() as session:
        while True:
            try:
                index, url = todo.get_nowait()
            except queue.Empty:
                break
            try:
                with session.get(url, stream=True, timeout=60) as response:
                    if response.status_code != 200:
                        errors.append(f"{url}: {response.status_code}")
                        continue
                    with open(outdir / str(index), "wb") as out:
                        for chunk in response.iter_content(CHUNK):
                            out.write(chunk)
                            total += len(chunk)
            except (OSError, requests.RequestException) as exc:
                errors.append(f"{url}: {exc}")
    done.append(total)


def main(argv: list[str] | None = None) -> int:
    args, urls = loops.parse(__doc__, "threads", argv)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in enumerate(urls):
        todo.put(item)
    done: list[int] = []
    errors: list[str] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(todo, args.out, done, errors), name=f"get-{i}")
               for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return loops.report("requests_loop", time.perf_counter() - started, len(urls), sum(done), errors)


if __name__ == "__main__":
    sys.exit(main())
