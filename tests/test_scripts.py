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


# scripts/install-system: Debian packages without services, with stand-ins
# for sudo, apt-get and Debian's service tools that record what they were
# asked (nothing on the machine changes).

SUDO = """#!/bin/bash
echo "sudo $*" >> "$LIVEMAP_TEST_LOG"
[ "$1" = -n ] && exit 0
while [[ "$1" == env || "$1" == *=* ]]; do shift; done
case "$1" in
  tee|chmod|rm) exec "$(PATH=/usr/bin:/bin command -v "$1")" "${@:2}" ;;  # the test's policy file
esac
[ -x "$LIVEMAP_TEST_STUBS/$1" ] && exec "$LIVEMAP_TEST_STUBS/$1" "${@:2}"
exit 0
"""
APT_GET = """#!/bin/bash
echo "apt-get $*" >> "$LIVEMAP_TEST_LOG"
if [ "$1" = install ]; then
  if [ -x "$LIVEMAP_POLICY_RC_D" ]; then
    for name in nginx haproxy redis-server; do
      "$LIVEMAP_POLICY_RC_D" "$name" start; echo "policy for $name: $?" >> "$LIVEMAP_TEST_LOG"
    done
  else
    echo "no policy" >> "$LIVEMAP_TEST_LOG"
  fi
fi
"""
RECORDER = """#!/bin/bash
echo "${0##*/} $*" >> "$LIVEMAP_TEST_LOG"
"""


def run_install_system(tmp_path: Path, *, sudo: bool, policy_before: str = ""
                       ) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    scripts = {"id": "#!/bin/bash\necho 1000\n", "apt-get": APT_GET,
               "deb-systemd-helper": RECORDER, "update-rc.d": RECORDER,
               "systemctl": RECORDER}
    if sudo:
        scripts["sudo"] = SUDO
    for name, text in scripts.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    policy = tmp_path / "policy-rc.d"
    if policy_before:
        policy.write_text(policy_before)
        policy.chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    empty = tmp_path / "empty"  # no nginx, haproxy, chromium... anywhere
    empty.mkdir()
    env = {"PATH": f"{stubs}", "HOME": str(tmp_path), "LIVEMAP_TEST_LOG": str(log),
           "LIVEMAP_TEST_STUBS": str(stubs), "LIVEMAP_POLICY_RC_D": str(policy),
           "LIVEMAP_SBIN": str(empty)}
    bash = subprocess.run(["bash", "-c", "command -v bash"], capture_output=True, text=True,
                          check=True).stdout.strip()
    result = subprocess.run([bash, str(ROOT / "scripts" / "install-system"), "--test"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    return result, log.read_text().splitlines(), policy


ROOT = Path(__file__).resolve().parent.parent


def test_install_system_starts_no_service_and_leaves_no_boot_links(tmp_path: Path) -> None:
    result, log, policy = run_install_system(tmp_path, sudo=True)
    assert result.returncode == 0, result.stderr
    install = next(i for i, line in enumerate(log) if line.startswith("apt-get install"))
    assert "nginx" in log[install] and "haproxy" in log[install], log
    # During the install a policy forbids nginx's and haproxy's starts, and only theirs.
    assert log[install + 1:install + 4] == [
        "policy for nginx: 101", "policy for haproxy: 101", "policy for redis-server: 0"], log
    after = log[install + 4:]
    for name in ("nginx", "haproxy"):
        assert f"deb-systemd-helper disable {name}.service" in after, log
        assert f"update-rc.d {name} disable" in after, log
    assert not policy.exists()  # the policy was for this install only


def test_install_system_keeps_the_machines_own_policy(tmp_path: Path) -> None:
    docker = "#!/bin/sh\nexit 101\n"
    result, log, policy = run_install_system(tmp_path, sudo=True, policy_before=docker)
    assert result.returncode == 0, result.stderr
    assert policy.read_text() == docker
    assert "policy for redis-server: 101" in log  # the machine's, not ours
    assert "deb-systemd-helper disable nginx.service" in log


def test_install_system_without_root_or_sudo_installs_nothing_and_says_so(
        tmp_path: Path) -> None:
    result, log, policy = run_install_system(tmp_path, sudo=False)
    assert result.returncode == 0, result.stderr
    assert log == []
    assert not policy.exists()
    assert result.stderr.startswith("not root and no sudo: not installing "), result.stderr
    assert "nginx" in result.stderr and "(their tests will be skipped)" in result.stderr
