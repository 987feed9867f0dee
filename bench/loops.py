"""What the reference download loops (``requests_loop.py``, ``curl_loop.py``) share: their
command line and their one-line JSON report. Imports nothing heavy: the loops' start-up
counts in their CPU time."""

import argparse
import json
import resource
import sys
from pathlib import Path


def parse(doc: str, concurrency: str, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The loop's arguments (``--urls``, ``--out`` made, ``--<concurrency>`` 16) and its URLs."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--urls", type=Path, required=True, help="a file with one URL a line")
    parser.add_argument("--out", type=Path, required=True, help="directory for the files (created)")
    parser.add_argument(f"--{concurrency}", type=int, default=16)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args, [line.strip() for line in args.urls.read_text().splitlines() if line.strip()]


def report(name: str, seconds: float, files: int, total: int, errors: list[str]) -> int:
    """Print the run's JSON (``seconds``, ``files``, ``bytes``, ``max_rss_kib``); the exit status."""
    if errors:
        print(f"{name}: {len(errors)} download(s) failed, first: {errors[0]}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": seconds, "files": files, "bytes": total,
                      "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0
