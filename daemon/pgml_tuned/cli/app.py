"""`pgml-tuned`'s entry point: parse, run one command, turn a user's error into one line and an exit code."""

from __future__ import annotations

import os
import sys

import psycopg

from .. import __version__
from ..errors import connection_message
from .dsn import CliError
from .output import sanitised
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Run one command, everything it prints (results, errors, a daemon's log lines) through output.safe():
    control characters from the database (a project's name, an error) reach the terminal shown escaped."""
    with sanitised():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    """A user's error is one line on stderr, never a traceback: exit 2 for a wrong invocation
    or an unreachable database, 1 for what the database refused and for failed jobs."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # `pgml-tuned status | head`: the reader has what it wanted; exit quietly like `git log | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a process killed by it
    except CliError as e:
        print(f"pgml-tuned: {e}", file=sys.stderr)
        return e.code
    except ValueError as e:
        print(f"pgml-tuned: {e}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as e:
        print(f"pgml-tuned: lost the connection to the database: {connection_message(e, None)}", file=sys.stderr)
        return 2
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedColumn) as e:
        # a pgml schema older than this pgml-tuned (the commands check that there is one at all)
        print(
            f"pgml-tuned: {e.diag.message_primary or e}: the pgml schema is older than pgml-tuned {__version__}; "
            "an administrator upgrades it with `pgml-tuned migrate`",
            file=sys.stderr,
        )
        return 2
    except psycopg.Error as e:
        hint = e.diag.message_hint
        print(f"pgml-tuned: {e.diag.message_primary or e}" + (f"\n  HINT: {hint}" if hint else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
