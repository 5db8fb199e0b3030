"""``ovtasks`` command line: one sub-command per pipeline stage, plus ``demo`` and ``config``.

Configuration is parsed once here (``--config`` YAML + ``OVTASKS_*`` environment) and passed down.
Exit codes: 0 success, 1 a shard failed (details in the report), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ovtasks import __version__
from ovtasks.cli import data, models, ops
from ovtasks.core.config import ConfigError, load_settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovtasks", description="Open-vocabulary pseudo-mask platform: pipeline stages as commands.")
    p.add_argument("--version", action="version", version=f"ovtasks {__version__}")
    p.add_argument("--config", help="YAML config file (default $OVTASKS_CONFIG); OVTASKS_* env vars override it")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data.add_commands(sub)
    models.add_commands(sub)
    ops.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ovtasks: {exc}", file=sys.stderr)
        return 2
    from ovtasks.core.logs import setup_logging

    setup_logging(settings.log_format)
    try:
        code = args.func(args, settings)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `ovtasks plan ... | head -2`: the reader left; stop quietly, as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"ovtasks {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line and an exit code, never a traceback
        code, message = explain_error(exc)
        print(f"ovtasks {args.command}: {message}", file=sys.stderr)
        if os.environ.get("OVTASKS_TRACEBACK"):
            traceback.print_exc()
        return code


EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE: a bug in ovtasks, not in the input


def explain_error(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line): 2 for what the user can fix (arguments, config, input files, the store or
    a service that cannot be reached or refuses), 70 for anything else (a bug; OVTASKS_TRACEBACK=1 shows it)."""
    from ovtasks.core.storage import StoreError

    def one_line(text: str) -> str:
        text = " / ".join(line.strip() for line in str(text).splitlines() if line.strip())
        return text if len(text) <= 500 else text[:497] + "..."

    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return 2, one_line(f"{exc.strerror or type(exc).__name__}: {exc.filename}")
    user_side = (ValueError, LookupError, OSError, StoreError, TimeoutError)
    try:
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError as Urllib3Error

        user_side += (MinioException, Urllib3Error)
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    if isinstance(exc, user_side):
        return 2, one_line(str(exc) or type(exc).__name__)
    return EXIT_INTERNAL, one_line(f"internal error: {type(exc).__name__}: {exc} (set OVTASKS_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
