"""
scripts/run as a newcomer meets it, in a copy of the checkout: the first
start installs quietly (no setuptools warning box), a second start installs
nothing, and the last line of the start says the page's address.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port
from test_packaging import copy_checkout

URL_LINE = re.compile(r"livemap is up: open (http://[\w.]+:(\d+)/)$")


def start_and_stop(checkout: Path, port: int, log: Path) -> list[str]:
    """scripts/run until the page answers; its output's lines at that moment."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", "scripts/run", "--port", f"tcp:{port}:interface=127.0.0.1",
             "--pirate", "none"], cwd=checkout, stdout=out, stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # an install may fetch setuptools
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            lines = log.read_text().splitlines()
            if lines and URL_LINE.search(lines[-1]):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no address line:\n{log.read_text()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            assert answer.status == 200
        return lines
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_scripts_run_installs_once_quietly_and_ends_its_start_with_the_address(
        tmp_path: Path) -> None:
    checkout = copy_checkout(tmp_path / "checkout")
    # The checkout's venv reaches this run's dependencies (a .pth), so the
    # install builds livemap alone.
    subprocess.run([sys.executable, "-m", "venv", checkout / ".venv"], check=True, timeout=120)
    [site] = (checkout / ".venv" / "lib").glob("python3*/site-packages")
    [ours] = [entry for entry in sys.path if entry.endswith("site-packages")
              and Path(entry, "twisted").is_dir()]
    (site / "livemap-test-dependencies.pth").write_text(ours + "\n")

    port = free_port()
    first = start_and_stop(checkout, port, tmp_path / "first.log")
    assert URL_LINE.search(first[-1]).group(1) == f"http://127.0.0.1:{port}/"
    assert not [line for line in first if "*****" in line or "!!" in line], first
    stamp = checkout / ".venv" / "livemap-install.stamp"
    installed = {path: path.stat().st_mtime_ns
                 for path in [stamp, *site.glob("__editable__*"), *site.glob("livemap-*")]}
    assert len(installed) >= 3, installed

    port = free_port()
    began = time.monotonic()
    second = start_and_stop(checkout, port, tmp_path / "second.log")
    took = time.monotonic() - began
    assert URL_LINE.search(second[-1]).group(1) == f"http://127.0.0.1:{port}/"
    # Nothing was installed again: the same files, and only the server's log lines.
    assert {path: path.stat().st_mtime_ns for path in installed} == installed
    assert all(re.match(r"^\d{4}-\d\d-\d\dT", line) for line in second), second
    print(f"second scripts/run: the page answered after {took:.1f} s")

    # A new module needs no new install either (the default editable mode).
    (checkout / "livemap_tx" / "newcomer_probe.py").write_text("ANSWER = 42\n")
    probe = subprocess.run([checkout / ".venv" / "bin" / "python", "-c",
                            "import livemap_tx.newcomer_probe as p; print(p.ANSWER)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert probe.stdout == "42\n", probe.stderr
