"""The ``gdl`` command: patches gevent first, then parses, configures and runs.

    gdl [--config FILE] [--log-level LEVEL] [--log-format text|json] [ROLE]

With no role, one process runs every role (api, processor, notifier). A bad
config, an unreachable Redis or an unwritable directory is one line on
stderr and exit status 2.
"""

# Patching must happen before anything imports socket, ssl or threading
# (requests, redis, urllib3): otherwise they keep unpatched, blocking references.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from gdl import __version__, config, logs  # noqa: E402
from gdl.errors import ConfigError, StartupError  # noqa: E402

log = logging.getLogger("gdl")

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdl", description="Asynchronous, rate-limited download service.")
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--version", action="version", version=f"gdl {__version__}")
    parser.add_argument("role", nargs="?", choices=["api", "processor", "notifier"],
                        help="run one role only (default: all of them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        cfg = config.load(args.config)
        return run_service(cfg, args.role)
    except (ConfigError, StartupError) as exc:
        print(f"gdl: {exc}", file=sys.stderr)  # the one line an operator reads; logging may not be set up
        return EXIT_USAGE


def run_service(cfg: config.Config, role: str | None) -> int:
    from gdl.service import ROLES, Service

    service = Service(cfg, (role,) if role else ROLES)
    service.install_signal_handlers()
    try:
        service.start()
    except BaseException as exc:
        # A startup failure is one line on stderr (printed by main): the cleanup's
        # info lines ("stopped in 0.0s") would bury it. Warnings and errors still show.
        if isinstance(exc, (ConfigError, StartupError)):
            logging.disable(logging.INFO)
        try:
            service.shutdown(deadline=3)
        finally:
            logging.disable(logging.NOTSET)
        raise
    service.wait()
    service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
