"""The ``gdl`` command: patches gevent first, then parses, configures and runs.

    gdl [--config FILE] [--log-level LEVEL] [--log-format text|json] [ROLE]
    gdl [--config FILE] COMMAND [OPTIONS]     enqueue | status | job | retry-failed | fsck

With no role, one process runs every role (api, processor, notifier). The
operator commands live in :mod:`gdl.commands`. A bad config, an unreachable
Redis or an unwritable directory is one line on stderr and exit status 2.
"""

# Patching must happen before anything imports socket, ssl or threading
# (requests, redis, urllib3): otherwise they keep unpatched, blocking references.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

from gdl import __version__, commands, config, logs  # noqa: E402
from gdl.errors import ConfigError, StartupError, StoreUnavailable  # noqa: E402

log = logging.getLogger("gdl")

EXIT_USAGE = 2
ROLES = ("api", "processor", "notifier")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", default=default,
                        help="YAML config (default: built-in defaults)")
    parser.add_argument("--log-level", default=default, choices=LOG_LEVELS,
                        help="default: $GDL_LOG_LEVEL, else info for the service, warning for commands")
    parser.add_argument("--log-format", default=default, choices=LOG_FORMATS,
                        help="default: $GDL_LOG_FORMAT, else text")


class _Version(argparse.Action):
    """``--version``: gdl's version and which HTTP engines can run here (importing them only then)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=str(kwargs.get("help")))

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        from gdl.http import availability

        sys.stdout.write(f"gdl {__version__} (engines: {availability()})\n")  # as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdl", description="Asynchronous, rate-limited download service.")
    _global_options(parser, None)
    parser.add_argument("--version", action=_Version, help="print gdl's version and its HTTP engines, and exit")
    # The global options may also follow the role or command; there they must not
    # overwrite a value given before it, hence SUPPRESS.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="ROLE or COMMAND",
                                title="roles (default: all of them in one process) and operator commands")
    for role in ROLES:
        sub.add_parser(role, parents=[common], help=f"run the {role} role only")
    commands.add_parsers(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command if args.command in commands.COMMANDS else None
    try:
        level = _option(args.log_level, "GDL_LOG_LEVEL", LOG_LEVELS) or ("warning" if command else "info")
        logs.setup(level, _option(args.log_format, "GDL_LOG_FORMAT", LOG_FORMATS) or "text")
    except ConfigError as exc:
        print(f"gdl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = config.load(args.config)
        if command:
            return commands.run(command, args, cfg)
        return run_service(cfg, args.command)
    except (ConfigError, StartupError, StoreUnavailable) as exc:
        print(f"gdl: {exc}", file=sys.stderr)  # the one line an operator reads: no timestamp, no logger name
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C in a command (the service handles SIGINT itself)
        return 130


def _option(given: str | None, variable: str, choices: tuple[str, ...]) -> str | None:
    """A logging option: the command line's, else the environment's (checked like the line's)."""
    if given is not None:
        return given
    value = os.environ.get(variable) or None
    if value is not None and value not in choices:
        raise ConfigError(f"{variable}: must be one of {', '.join(choices)} (got {value!r})")
    return value


GC_YOUNG_THRESHOLD = 10_000


def run_service(cfg: config.Config, role: str | None) -> int:
    # Imported here, not at the top: the operator commands need none of it. A missing
    # library (libmagic) is a StartupError raised by this import: one line, exit 2.
    from gdl import mime
    from gdl.service import ROLES, Service

    if role in (None, "processor"):
        mime.check_libmagic()
    raise_open_files_limit()
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
    # What is alive now (modules, config, the service's objects) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it each
    # time a burst of short-lived objects (a batch's jobs) sets one off. And a young
    # collection every GC_YOUNG_THRESHOLD new containers rather than Python's 700: a
    # batch of 1,000 jobs makes about ten thousand, nearly all freed by reference counts
    # when its answer is sent, which at 700 were walked and promoted ten times a request.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    service.wait()
    service.shutdown()
    return 0


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one.

    A service holds a socket per download, callback and API client, and a
    processor keeps idle connections for every host its pools fetch from
    (one session per proxy, shared by all pools); the usual soft limit of
    1024 is soon short. The hard limit is the operator's (ulimit -Hn,
    systemd's LimitNOFILE) and is left alone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or (hard != unlimited and soft >= hard):
        return
    target = hard if hard != unlimited else max(soft, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files: cannot raise the limit from %d to %d: %s", soft, target, exc)
        return
    log.info("open files: limit raised from %d to %d", soft, target)


if __name__ == "__main__":
    sys.exit(main())
