"""`twistd livemap`: the plugin loads, options are checked, and the real daemon runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import pytest_twisted
from twisted.application.service import IServiceMaker
from twisted.internet import endpoints, reactor
from twisted.plugin import getPlugins
from twisted.python import usage

from conftest import free_port, start_twistd, twistd_command
from livemap_tx.service import Options, with_backlog
from wsclient import connect


def test_twistd_finds_the_plugin():
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert makers["livemap"].options is Options


ROOT = Path(__file__).resolve().parent.parent
# Where an installed livemap's parts come from, as a fresh interpreter sees them.
WHERE = """
import json, sys
import livemap_tx.web, twisted.plugins.livemap_plugin as plugin
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
print(json.dumps({"web_root": str(livemap_tx.web.WEB_ROOT), "plugin": plugin.__file__,
                  "package": livemap_tx.__file__, "sys_path": sys.path,
                  "tapnames": [maker.tapname for maker in getPlugins(IServiceMaker)]}))
"""


def test_the_development_install_runs_the_checkout_without_it_on_sys_path(tmp_path):
    """
    scripts/install's editable install (pip's default mode): from anywhere,
    the plugin, the code and the page are the checkout's own files, reached
    through setuptools' import hook and build/'s link to the plugin, not
    through the checkout on sys.path (the deprecated compat mode's way).
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", WHERE], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    where = json.loads(result.stdout)
    assert Path(where["plugin"]).resolve() == ROOT / "twisted" / "plugins" / "livemap_plugin.py"
    assert Path(where["package"]).resolve() == ROOT / "livemap_tx" / "__init__.py"
    assert Path(where["web_root"]) == ROOT / "web"
    assert where["tapnames"].count("livemap") == 1
    assert str(ROOT) not in [os.path.realpath(entry) for entry in where["sys_path"] if entry]


def test_version_is_the_installed_distributions(tmp_path):
    """`twistd livemap --version` says which livemap runs, as its metadata says."""
    result = subprocess.run(twistd_command("--version"), capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"livemap {metadata.version('livemap')} (Twisted "), result.stdout


def test_defaults():
    options = Options()
    options.parseOptions([])
    assert (options["port"], options["pirate"], options["rate"], options["tick"]) == (
        "tcp:8080", "tcp:8007", 10.0, 0.1)
    assert "tile.openstreetmap.org" in options["tiles"]


@pytest.mark.parametrize("args, named", [
    (["--rate", "fast"], "--rate"), (["--rate", "0"], "--rate"), (["--rate", "-3"], "--rate"),
    (["--tick", "10"], "--tick"), (["--port", "tcp:notaport"], "--port"),
    (["--port", "bogus:1"], "--port"), (["--pirate", "tcp:"], "--pirate"),
    (["--tiles", "https://tiles.example/{z}.png"], "--tiles"), (["--ping", "nan"], "--ping"),
    (["--ping", "0.5"], "--ping"),
])
def test_bad_values_are_usage_errors_naming_the_option(args, named):
    with pytest.raises(usage.UsageError, match=named):
        Options().parseOptions(args)


def test_help_documents_every_option():
    result = subprocess.run(twistd_command("--help"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in Options.optParameters:
        assert f"--{option[0]}" in result.stdout


def test_backlog_is_raised_unless_given():
    assert with_backlog("tcp:8080") == "tcp:8080:backlog=1024"
    assert with_backlog("tcp:8080:backlog=5") == "tcp:8080:backlog=5"
    assert with_backlog("unix:/tmp/x") == "unix:/tmp/x"


def test_busy_port_fails_at_start_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            twistd_command("--port", f"tcp:{port}:interface=127.0.0.1", "--pirate", "none"),
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr == (f"livemap: port {port} on 127.0.0.1 is already in use by another "
                             f"program: stop it, or choose another port with --port\n")
    assert "Traceback" not in result.stdout


@pytest_twisted.ensureDeferred
async def test_real_daemon_serves_websocket_and_pirate_then_stops_on_sigterm(tmp_path):
    pirate_port = free_port()
    server = start_twistd(tmp_path, "--pirate", f"tcp:{pirate_port}:interface=127.0.0.1")
    try:
        alice = await connect(server.ws_url("daemon"))
        alice_id = (await alice.next("welcome"))["id"]
        bob = await connect(server.ws_url("daemon"))
        await bob.next("welcome")
        alice.send({"type": "move", "lat": 51.5, "lng": -0.12, "seq": 1})
        update = await bob.until(lambda m: m["type"] == "update" and m["pins"])
        assert update["pins"][0]["id"] == alice_id

        pirate = socket.create_connection(("127.0.0.1", pirate_port), timeout=5)
        pirate.recv(1024)  # greeting
        pirate.sendall(b"hello my friend\r\n")
        reply = b""
        while b"\n" not in reply:
            reply += pirate.recv(1024)
        assert reply.lower().startswith(b"ahoy me matey")
        pirate.close()

        started = time.monotonic()
        server.process.terminate()
        codes = [(await client.wait_closed(timeout=5))[0] for client in (alice, bob)]
        assert codes == [1001, 1001]
        while server.process.poll() is None and time.monotonic() - started < 10:
            await deferLater(0.05)
        assert server.process.returncode in (0, -15)  # twistd re-raises the signal it stopped on
        assert time.monotonic() - started < 5, server.log()
    finally:
        server.stop()


def deferLater(seconds):  # noqa: N802
    from twisted.internet import task
    return task.deferLater(reactor, seconds)
