"""Errors a user can cause. Each message is one sentence that names the fix."""

from __future__ import annotations


class DriftpromptError(Exception):
    """Base class of every user-facing error; the CLI prints the message without a traceback."""


class ConfigError(DriftpromptError):
    """A configuration file, key, value or override is wrong."""


class PluginError(DriftpromptError):
    """A strategy or stream cannot be found, is registered twice, or failed while running."""


class BackboneError(DriftpromptError):
    """A backbone cannot be built or its weights cannot be loaded."""


class CheckpointError(DriftpromptError):
    """A checkpoint is missing, unreadable or belongs to another run or model."""


class StreamError(DriftpromptError):
    """A stream cannot be built from the given data or options."""


class RunInterrupted(BaseException):
    """SIGTERM, raised like ``KeyboardInterrupt`` so that ``finally`` blocks and atomic writes finish."""


def condense(text: str, limit: int = 300) -> str:
    """One line from a message that may span several (PyTorch's unpickling errors do).

    Keeps the first line that says something, drops ANSI escapes and the trailing full stop,
    and cuts overly long text, so that it can be embedded in one sentence.
    """
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = " ".join(line.split()).rstrip(".:;, ")
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def load_error_cause(exc: BaseException) -> str:
    """The cause inside a reader's (often multi-line) message, as ``Type: first sentence``.

    ``torch.load`` with ``weights_only=True`` wraps the real cause in a paragraph of advice
    (its ``WeightsUnpickler error:`` line is kept); zip and tar readers append hints after
    the first sentence. Terminal colour codes are dropped.
    """
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error: *(.*)", text)
    if found:
        text = found.group(1)
    lines = [line.strip(" -\t") for line in text.splitlines() if line.strip(" -\t")]
    first = lines[0] if lines else ""
    if first.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:" then the cause
        first = lines[1]
    first = first.split(". ")[0].rstrip(".:")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


_OS_HINTS = {
    "EACCES": "check the permissions of that path or choose another location",
    "EPERM": "check the permissions of that path or choose another location",
    "EROFS": "the file system is read-only; choose a writable location",
    "ENOSPC": "free some disk space, then continue the run with --resume",
    "EDQUOT": "free some disk quota, then continue the run with --resume",
    "ENOTDIR": "a part of the path is a file, not a folder; choose another path",
    "EEXIST": "a file is in the way; choose another path",
    "ENOENT": "check the path",
    "EISDIR": "the path is a folder; pass a file",
    "ENAMETOOLONG": "choose a shorter path",
}


def os_cause(exc: OSError) -> tuple[str, str]:
    """``(cause, what to do)`` for an ``OSError``, from its errno."""
    import errno as _errno

    code = _errno.errorcode.get(exc.errno or 0, "")
    cause = exc.strerror or condense(str(exc)) or type(exc).__name__
    return cause, _OS_HINTS.get(code, "check the path and try again")


def describe_os_error(exc: OSError) -> str:
    """``OSError`` as one sentence naming the path, the cause and what to do."""
    cause, hint = os_cause(exc)
    if exc.filename is None:
        return f"An input or output operation failed ({type(exc).__name__}: {cause}); check the data files and the output folder."
    where = f" '{exc.filename}'"
    if exc.filename2 is not None:
        where += f" -> '{exc.filename2}'"
    return f"Cannot use{where}: {cause}; {hint}."


def describe(exc: BaseException) -> str:
    """The one sentence that the CLI prints (and a failed run records) for any exception."""
    if isinstance(exc, DriftpromptError):
        text = condense(str(exc), limit=2000)
        return text if text.endswith(("?", "!")) else text + "."
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted by SIGINT; continue with --resume RUN_DIR."
    if isinstance(exc, RunInterrupted):
        return "Stopped by SIGTERM; continue with --resume RUN_DIR."
    if isinstance(exc, MemoryError):
        return "Out of memory; use a smaller train.batch_size or eval.batch_size."
    return f"Unexpected {type(exc).__name__}: {condense(str(exc))}; rerun with --debug (or DRIFTPROMPT_DEBUG=1) for the traceback and report it."


class RunFinished(DriftpromptError):
    """``--resume`` of a run that already finished: nothing is changed on disk."""


class naming:  # noqa: N801 - used as a context manager, like contextlib's helpers
    """Give an ``OSError`` raised inside the block the path it concerns, when it has none
    (``write()`` on a full disk says only "No space left on device")."""

    def __init__(self, path: object) -> None:
        self.path = str(path)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, OSError) and exc.filename is None:
            try:
                renamed = type(exc)(exc.errno, exc.strerror or str(exc), self.path)
            except Exception:  # noqa: BLE001 - an OSError subclass with another constructor
                return False
            raise renamed from exc
        return False
