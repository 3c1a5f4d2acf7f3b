"""What every command shares: a help formatter that shows defaults and keeps the
description's layout, and the refusal that torchrun reports as the root cause.

Nothing heavy is imported here (no torch): `--help` must answer at once."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from phoclip.data.text import strip_controls
from phoclip.errors import one_line
from phoclip.fileio import read_regular


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (its example commands keep their lines) and each
    flag's default after its meaning, unless the help already says it or there is none
    worth saying (an unset option, a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def record_refusal(message: str, exit_code: int = 2) -> None:
    """Under torchrun (torch.distributed.elastic), write our one-line message into the
    error file the agent reads (env TORCHELASTIC_ERROR_FILE), so its failure summary names
    it as the root cause instead of "To enable traceback see: ...". Elsewhere: nothing.

    The layout is the one torch's `@record` decorator writes, with our line where it puts
    the Python traceback (torchrun shows `py_callstack` as the root cause; a refusal has
    no traceback worth showing), so torchrun also records our exit code in it.
    A file already there (an earlier failure of this process) is kept: the first
    failure is the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "x", encoding="utf-8") as f:
            line = f"{message} (exit code {exit_code})"
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
        os.replace(tmp, path)
    except OSError:  # the report is a courtesy: the exit code and our log line still say it
        pass


def read_lines(path: str, max_bytes: int = 1 << 20) -> list[str]:
    """The non-blank lines of a small UTF-8 text file someone hands a command (tags,
    labels): a regular file under `max_bytes`, else a one-line refusal naming it."""
    try:
        text = read_regular(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def refuse(prog: str, error: BaseException) -> int:
    """An expected error of command `prog`: one line on stderr (and in torchrun's error
    file), exit status 2. Every command ends its refusals here."""
    msg = strip_controls(one_line(error))  # a file name or caption from outside: no terminal controls
    print(f"{prog}: {msg}", file=sys.stderr)
    record_refusal(msg)
    return 2
