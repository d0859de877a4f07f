"""
The child's side of `--workers` (the parent's is workers.py): what
`python -m livemap_tx.worker_process` runs. It is a module of its own
because it builds its node with service.py, which imports workers.py: so
the imports point one way (service -> workers, worker_process -> both).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from twisted.internet import error, fdesc
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import service as wiring  # the one place that wires parts together
from .workers import CONFIG_VARIABLE, WorkerSpec

log = Logger()


@implementer(IReadDescriptor)
class _ParentWatch:
    """Reads the pipe from the parent on stdin; its end means the parent is gone."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Any:  # noqa: N802
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return error.ConnectionLost()
        return None if data else error.ConnectionDone()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.reactor.removeReader(self)
        log.info("the parent process is gone: stopping")
        if self.reactor.running:
            self.reactor.stop()

    def logPrefix(self) -> str:  # noqa: N802
        return "parent-watch"


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def main() -> None:
    """
    A worker process: `python -m livemap_tx.worker_process`, its configuration in
    the environment (not the command line, which every local user can read:
    it may hold the Redis password).
    """
    _die_with_parent()
    config = json.loads(os.environ.pop(CONFIG_VARIABLE))
    from twisted.internet import reactor
    from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

    # The parent adds the time and the worker's number to each line.
    observer = FileLogObserver(
        sys.stdout, lambda event: (formatEventAsClassicLogText(
            event, formatTime=lambda when: "-") or "- ")[2:])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    options = wiring.Options()
    options.update(config["options"])
    spec = WorkerSpec(**{**config["worker"],
                         "private_ports": tuple(config["worker"]["private_ports"])})
    top = wiring.make_worker_service(reactor, options, spec)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    fdesc.setNonBlocking(0)
    reactor.addReader(_ParentWatch(reactor))
    reactor.run()


if __name__ == "__main__":
    main()
