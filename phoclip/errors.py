"""The errors an entry point reports as one line and a non-zero exit (not a traceback):
a file or setting we refuse, or a component that is missing. Anything else is a bug and
keeps its traceback."""
from __future__ import annotations


class SetupError(RuntimeError):
    """A component the command needs is missing or unusable (a tokenizer, the VnCoreNLP
    model, Java); the message says what to install or pass."""


class CheckpointError(ValueError):
    """A checkpoint file we refuse to load (unsafe, incomplete or unreadable); the
    message names the file and the problem."""


# ValueError covers ConfigError, BadSample, JSON and Unicode errors; OSError covers
# missing and unreadable files
EXPECTED_ERRORS = (ValueError, OSError, SetupError)


def one_line(e: BaseException) -> str:
    """An expected error as one line; one re-raised from a DataLoader worker carries the
    worker's traceback in its message, whose last line is the original error."""
    msg = str(e).strip() or type(e).__name__
    if "Original Traceback" in msg:
        return msg.splitlines()[-1].strip()
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())  # hints span lines
