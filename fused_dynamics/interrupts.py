"""SIGINT and SIGTERM as KeyboardInterrupt, never in the middle of a write to the outputs.

The command line installs the handlers around a run (:meth:`Interrupts.installed_handlers`);
the outputs' writer (:class:`~fused_dynamics.run_outputs.TeeSink`) defers them while it
writes (:meth:`Interrupts.deferred`), so after Ctrl-C or SIGTERM every output holds the same
systems and every record is whole. The application service turns the interrupt into a
:class:`RunInterrupted` that says what was written and where ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
from collections.abc import Sequence

__all__ = ["INTERRUPTS", "Interrupts", "RunInterrupted", "resume_command"]


def resume_command(args: Sequence[str], prog: str = "fused-dynamics") -> str:
    """The command line that continues an interrupted run, quoted for a POSIX shell.

    The same arguments with ``--resume`` added and ``--overwrite`` dropped (it would replace
    what the interrupted run wrote, checkpoint included).

    Examples
    --------
    >>> resume_command(["run", "my job.toml", "--overwrite"])
    "fused-dynamics run 'my job.toml' --resume"
    """
    kept = [a for a in args if a != "--overwrite"]
    if "--resume" not in kept:
        kept.append("--resume")
    return shlex.join([prog, *kept])


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, with what it leaves behind.

    ``args[0]`` is the signal number (as for the KeyboardInterrupt it replaces); ``lines`` say
    what every output holds and where ``--resume`` continues (the last checkpoint's step).
    """

    def __init__(self, signum: int, lines: list[str]):
        super().__init__(signum)
        self.lines = list(lines)


class Interrupts:
    """Turns SIGINT and SIGTERM into KeyboardInterrupt, never in the middle of a write.

    While :meth:`deferred` is active (a write to the outputs), a signal is remembered and
    raised when the write is complete, so every output holds the same systems and every
    record is whole.
    """

    def __init__(self):
        self.depth = 0
        self.pending: int | None = None
        self.installed = False

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = signum
            return
        raise KeyboardInterrupt(signum)

    @contextlib.contextmanager
    def installed_handlers(self):
        """Install the handlers (main thread only; elsewhere a no-op)."""
        try:
            old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            yield
            return
        self.installed, self.pending = True, None
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.installed = False

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise KeyboardInterrupt(signum)


#: The process's one instance.
INTERRUPTS = Interrupts()
