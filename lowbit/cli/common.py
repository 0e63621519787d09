"""What every ``lowbit`` command shares: the Typer app, checks of user input that need no torch, and
the one-line error format."""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Optional

import typer

from lowbit.errors import LowbitError

# Everything here validates its input before torch or transformers are imported (seconds of CPU
# and 500 MB), so that a typo costs a fraction of a second; heavy imports sit inside the commands.
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Post-training quantization of LLMs: GPTQ, QuIP, OAC, RPTQ, ASER and baselines.")
log = logging.getLogger("lowbit")
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
USER_FIXABLE_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"lowbit {version('lowbit')}")
        except PackageNotFoundError:  # run from a checkout that is not installed
            from lowbit import __version__

            typer.echo(f"lowbit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print lowbit's version and exit")) -> None:
    """Options that come before the command."""


def parse_datasets(spec: str) -> list[str]:
    """Named sets and text files, comma separated; each checked (a file: readable, of a known kind)."""
    from lowbit.data.sources import check_dataset

    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        check_dataset(n)
    return names


def check_windows(windows: Optional[int]) -> None:
    if windows is not None and windows <= 0:
        raise LowbitError(f"--windows must be a positive integer, got {windows}")


def check_device(name: Optional[str]) -> None:
    """The device's spelling, checked without torch; whether it exists is checked by :func:`torch_device`."""
    if name is not None and not DEVICE.fullmatch(name):
        raise LowbitError(f"unknown device '{name}' (cpu, cuda, cuda:N)")


def torch_device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"device '{name}' asked for, but no CUDA GPU is available")
    return dev


def check_writable(path: Path, flag: str) -> None:
    """An output folder (or the nearest folder above it that exists) must be a folder we may write."""
    if path.exists() and not path.is_dir():
        raise LowbitError(f"{flag} {path} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LowbitError(f"{flag} {path}: cannot write in {existing}")


def ppl_table(rows: dict[str, dict[str, float]], datasets: list[str]) -> str:
    head = "model".ljust(24) + "".join(f"{d:>12s}" for d in datasets)
    lines = [head] + [name.ljust(24) + "".join(f"{vals[d]:12.3f}" for d in datasets) for name, vals in rows.items()]
    return "\n".join(lines)


def one_line(message: str, limit: int = 500) -> str:
    """A message may quote what the user gave (a huge --set value): one line, and not a screenful."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def parse_size(text: str, flag: str) -> int:
    """``4GB``, ``512MB``, ``2.5G`` or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise LowbitError(f"{flag} must be a size such as 4GB or 512MB, got '{text}'")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))
