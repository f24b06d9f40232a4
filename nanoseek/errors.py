"""The one error path of the ``nanoseek`` command: whatever goes wrong ends in one line on stderr,

    nanoseek <command>: error: <what, where, what is allowed>

and a non-zero exit code, never a traceback (``--debug`` shows it):

    2    the input is wrong (config, arguments, a corrupt or foreign checkpoint, a run folder in use)
    1    the run cannot go on (a non-finite loss with train.on_nan='stop', a full disk, out of memory, a bug)
    130  interrupted by Ctrl-C (SIGINT)     143  terminated by SIGTERM — as shells expect

Inside a step loop the first SIGINT / SIGTERM is turned into a clean stop with a checkpoint
(``nanoseek.train.loop.deferred_interrupt``); anywhere else (start-up, loading, evaluation outside the loop) it
stops the command at once, with this one line.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from collections.abc import Callable


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a step loop (start-up, loading): stop like Ctrl-C, exit 143."""


def _terminate(signum, frame) -> None:
    raise Terminated("SIGTERM")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def describe(err: BaseException) -> tuple[str, int]:
    """(message, exit code) of an exception that ended a command."""
    from nanoseek.train.checkpoint import CheckpointError
    from nanoseek.train.engine import TrainingError

    if isinstance(err, Terminated):
        return "terminated (SIGTERM)", 143
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C outside a step loop, or a second one inside it
        return "interrupted" + (f": {one_line(err)}" if str(err) else ""), 130
    if isinstance(err, (ValueError, CheckpointError)):
        return f"error: {one_line(err)}", 2
    if isinstance(err, TrainingError):
        return f"error: {one_line(err)}", 1
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        if err.errno == errno.ENOSPC:
            return f"error: the disk is full{where}: free some space, then continue with --resume", 1
        return f"error: {err.strerror or one_line(err)}{where}", 1
    if isinstance(err, MemoryError):
        return "error: out of memory; use a smaller model, batch or number of samples", 1
    if isinstance(err, RecursionError):
        return "error: the input is nested too deeply", 2
    return f"error: internal error ({type(err).__name__}: {one_line(err)[:300]}); run with --debug for the traceback", 1


def run_command(command: Callable[[], int], prog: str, debug: bool = False) -> int:
    """Run ``command`` with SIGTERM stopping it like Ctrl-C; turn any exception into one line and an exit code
    (``debug``: re-raise it, traceback and all)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        return command()
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        message, code = describe(err)
        print(f"{prog}: {message}", file=sys.stderr)
        return code
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
