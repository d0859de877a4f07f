"""
The `livemap` command: `twistd -n livemap` for people who do not know
twistd. `livemap [OPTIONS]` takes livemap's options (`livemap --help`),
runs in the foreground, logs to standard output and writes no pid file;
twistd's own options (daemon, log file, user...) stay with `twistd`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

from twisted.application import app
from twisted.scripts.twistd import ServerOptions, runApp

# twistd's options for a foreground run that leaves nothing behind.
TWISTD_ARGS = ["--nodaemon", "--pidfile="]


class CommandOptions(ServerOptions):
    """twistd's options, knowing only livemap (no plugin scan) and named as the command."""

    # Twisted prints the subcommand and its synopsis after this:
    # "Usage: livemap [options]".
    synopsis = "Usage:"

    @staticmethod
    def _getPlugins(interface: Any, package: Any = None) -> list[Any]:  # noqa: N802
        # The plugin module itself (by name: mypy checks it as a file of its own).
        return [importlib.import_module("twisted.plugins.livemap_plugin").livemap]


def main(argv: Optional[list[str]] = None) -> None:
    """Run livemap in the foreground with `argv` (the command line by default) as its options."""
    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["livemap", *TWISTD_ARGS, "livemap", *args]
    app.run(runApp, CommandOptions)


if __name__ == "__main__":
    main()
