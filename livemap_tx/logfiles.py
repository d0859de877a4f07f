"""
SIGHUP reopens log files, so logrotate can move `twistd --logfile` aside
and the daemon writes to a fresh file (twistd itself only knows SIGUSR1,
which renames the file on its own terms).
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

from twisted.application import service
from twisted.logger import Logger, globalLogPublisher

log = Logger()


def _log_files() -> Iterator[Any]:
    # twisted.logger keeps no public list of observers' files; twistd's file
    # observer is a FileLogObserver whose file (a LogFile) can reopen itself.
    for observer in list(getattr(globalLogPublisher, "_observers", ())):
        out = getattr(observer, "_outFile", None)
        if out is not None and callable(getattr(out, "reopen", None)):
            yield out


def reopen_log_files() -> int:
    """Reopen every log file being written to; returns how many."""
    count = 0
    for log_file in _log_files():
        log_file.reopen()
        count += 1
    log.info("reopened {count} log file(s)", count=count)
    return count


class ReopenLogsOnHangup(service.Service):
    """While running, SIGHUP reopens the log files."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.previous: Any = None

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        self.previous = signal.signal(
            signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(reopen_log_files))

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self.previous is not None:
            signal.signal(signal.SIGHUP, self.previous)
            self.previous = None

