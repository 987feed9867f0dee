"""What the sha256 of every download costs on workload 1 (small files), next to the download's own CPU.

Every download is digested while it streams (the callback's ``sha256``,
:mod:`gdl.checksum`). This measures, in one process, the CPU of:

1. ``--jobs`` downloads of a ``SMALL_BYTES`` body through gdl's
   :class:`~gdl.download.Downloader` (the engine of ``--engine``, keep-alive,
   from a gevent WSGI server in a child process: its CPU is not counted),
   digest included, as a processor's worker runs them;
2. the digest alone of as many bodies of that size, as the downloader feeds it
   (one chunk: ``processor.chunk_size`` is larger than a small file).

and prints both per job and their ratio, with the digest's throughput::

    python bench/digest_cost.py                  # 5000 jobs of 16 KiB, curl engine
    python bench/digest_cost.py --jobs 20000 --engine requests

    small files: 3000 x 16 KiB, curl engine
    download (digest included):  779.3 us CPU per job
    sha256 of the body:           10.0 us CPU per job (1.3% of the download)
    sha256 throughput:          1631 MB/s (0.61 s CPU per GB)
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from common import free_port, wait_for  # noqa: E402

from gdl import checksum  # noqa: E402
from gdl.download import Downloader  # noqa: E402
from gdl.job import Job  # noqa: E402

SMALL_BYTES = 16 * 1024  # workload 1's file size (bench/throughput.py)
CHUNK_SIZE = 64 * 1024  # processor.chunk_size's default
SERVER = """
import sys
from gevent.pywsgi import WSGIServer
body = b"x" * int(sys.argv[2])
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", str(len(body))), ("Content-Type", "application/octet-stream")])
    return [body]
WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None).serve_forever()
"""


def download_cpu(url: str, jobs: int, engine: str, scratch_dir: str) -> float:
    """CPU seconds of ``jobs`` fetches, one after another on one kept-alive connection."""
    downloader = Downloader(proxy="", default_headers={}, scratch_dir=scratch_dir, chunk_size=CHUNK_SIZE,
                            engine=engine)
    job = Job(id="benchDigest000", url=url, aggr_id="bench", aggr_limit=1)
    try:
        downloader.fetch(job, timeout=10)  # the connection opened, outside the measure
        start = time.process_time()
        for _ in range(jobs):
            fetched = downloader.fetch(job, timeout=10)
            assert fetched.size == SMALL_BYTES and fetched.body is not None
        return time.process_time() - start
    finally:
        downloader.close()


def digest_cpu(jobs: int) -> float:
    """CPU seconds of the digest of ``jobs`` small bodies, fed as the downloader feeds it."""
    body = b"x" * SMALL_BYTES
    start = time.process_time()
    for _ in range(jobs):
        digests = checksum.Digests()
        digests.update(body)
        digests.check()
    return time.process_time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--engine", choices=("curl", "requests"), default="curl")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(SMALL_BYTES)])
    url = f"http://127.0.0.1:{port}/small.bin"

    def up() -> bool:
        try:
            return urllib.request.urlopen(url, timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_for("the file server", up)
        with tempfile.TemporaryDirectory() as scratch_dir:
            download = download_cpu(url, args.jobs, args.engine, scratch_dir)
        digest = digest_cpu(args.jobs)
    finally:
        server.terminate()
        server.wait(timeout=10)
    per_job = 1e6 / args.jobs
    gb_seconds = digest / (args.jobs * SMALL_BYTES) * 1e9
    print(f"small files: {args.jobs} x {SMALL_BYTES // 1024} KiB, {args.engine} engine")
    print(f"download (digest included): {download * per_job:6.1f} us CPU per job")
    print(f"sha256 of the body:         {digest * per_job:6.1f} us CPU per job "
          f"({digest / download:.1%} of the download)")
    print(f"sha256 throughput:          {1 / gb_seconds * 1000:.0f} MB/s ({gb_seconds:.2f} s CPU per GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
