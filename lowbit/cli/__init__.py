"""``lowbit quantize | eval | compare | inspect | export | export-lora | recipes`` — the command line over the
same API. Each command lives in its own module; importing them registers them on ``app``."""

from __future__ import annotations

import logging
import sys

import click
import typer

# isort: off
from lowbit.cli import quantize, evaluate, tools  # noqa: F401  (registers the commands, in --help order)
# isort: on
from lowbit.cli.common import USER_FIXABLE_OS_ERRORS, app, log, one_line
from lowbit.errors import LowbitError

__all__ = ["app", "main"]


def main() -> None:
    # lowbit's own messages once, on stderr; other libraries keep their own logging set-up
    # (a root handler here printed every hub warning twice)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        code = app(standalone_mode=False)  # usage errors come back to us, to be printed as one line
    except click.UsageError as exc:
        hint = f" (see: lowbit {exc.ctx.info_name if exc.ctx and exc.ctx.parent else ''} --help)".replace("  ", " ")
        typer.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except LowbitError as exc:
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in USER_FIXABLE_OS_ERRORS:
            raise
        typer.echo(f"error: {exc.strerror}: {exc.filename or 'a file lowbit writes'} (free space or choose another "
                   "folder; nothing was left half-written)", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
