"""Why a run failed, in one line, and no Python traceback for a failure graft expected.

A failed stage leaves its last output lines: the stage's own ``error: ...`` (graft's stages
end that way, gate failures included), a traceback when its code crashed, DVC's ``ERROR:``
lines. The reason is the most specific of them, and the StageFailed message is that one
line: the Prefect state, the UI and the end of `graft run`'s output show it; the stage's
whole output is in the run's log just above it. A failure graft expected (a stage that
failed, a refused param or placement, a busy workspace) is logged by Prefect's engine
without the traceback of graft's own code, which says nothing to a user
(:func:`quiet_expected_failures`).
"""

from __future__ import annotations

import logging
import re

# `dvc repro` reports the stage command's own exit code on its last line; its own is 255.
_EXITED = re.compile(r"failed to run: .*, exited with (-?\d+)")
_PYTHON_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*)(?:Error|Exception|Exit|Interrupt)\b.*")
# What `dvc repro` itself prints around a stage command's output.
_DVC_LINES = ("ERROR: ", "WARNING: ", "Running stage ", "> ", "Updating lock file", "Stage ")
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def failure_reason(tail: list[str]) -> str:
    """The one line that says why a stage failed, from the last lines of its `dvc repro`
    output (``tail``, oldest first), most specific first: a timeout or an interrupt graft
    reported, the stage's own ``error:`` message (with its indented continuation lines), the
    last line of a Python traceback, DVC's ``ERROR:`` line (when it only says that the command
    failed, the command's last output line instead), else the last line. Returns "" for no
    output at all. Raises nothing."""
    lines = [line.rstrip() for line in tail if line.strip()]
    for line in reversed(lines):
        if line.startswith(("timed out after ", "the run was interrupted")):
            return line
    for position in range(len(lines) - 1, -1, -1):
        if lines[position].startswith("error: "):
            said = lines[position].removeprefix("error: ")
            details = []
            for more in lines[position + 1 :]:
                if not more.startswith((" ", "\t")):
                    break
                details.append(more.strip())
            return f"{said.rstrip(':')}: {'; '.join(details)}" if details else said
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        for line in reversed(lines):
            if _PYTHON_ERROR.match(line):
                return line
    own = [line for line in lines if not line.startswith(_DVC_LINES)]
    for line in reversed(lines):
        if line.startswith("ERROR: "):
            if _EXITED.search(line) and own:  # DVC only says the command failed: show how
                return f"its last output: {own[-1].strip()}"
            return line.removeprefix("ERROR: ")
    return lines[-1] if lines else ""


def exit_note(code: int, tail: list[str]) -> str:
    """How the stage ended, truly: the stage command's exit code as DVC reports it, or
    `dvc repro`'s own ``code`` when DVC did not get as far as running it (-9: killed)."""
    for line in reversed(tail):
        found = _EXITED.search(line)
        if found:
            return f"its command exited with {found.group(1)}"
    return f"`dvc repro` exited with {code}"


def stage_failure(stage: str, code: int, tail: list[str], what: str = "failed") -> str:
    """The StageFailed message for ``stage`` whose `dvc repro` exited with ``code`` after
    printing ``tail`` (its last lines): ``stage 'x' <what>: <reason> (<how it ended>)``."""
    reason = failure_reason(tail) or "no output"
    return f"stage {stage!r} {what}: {reason} ({exit_note(code, tail)})"


def placed_failure(stage: str, pool: str, state_name: str, message: str) -> str:
    """The StageFailed message for ``stage`` whose placed run on work pool ``pool`` ended in
    the state ``state_name`` with ``message``: the stage's own reason when the run failed
    with one, else the first line of the run's message (its log is relayed above it)."""
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    said = first.partition("StageFailed: ")[2] or first
    said = said.removeprefix(f"stage {stage!r} failed: ")
    state = "" if state_name == "Failed" else f" ({state_name})"
    return f"stage {stage!r} failed on work pool {pool!r}{state}: {said}"


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (the reason, for graft's own errors), or its
    type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _WithoutTraceback(logging.Filter):
    """Drops the traceback from a log record about an exception of the ``expected`` types."""

    def __init__(self, expected: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.expected):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_expected_failures(*expected: type[BaseException]) -> None:
    """From now on, in this process, Prefect's engine logs an exception of the ``expected``
    types (a stage that failed, a refused parameter) without its traceback: the message,
    whose first line says why, is the whole story. Any other exception keeps its traceback.
    Idempotent. Raises nothing."""
    for name in _ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        for present in [f for f in logger.filters if isinstance(f, _WithoutTraceback)]:
            logger.removeFilter(present)
        logger.addFilter(_WithoutTraceback(expected))
