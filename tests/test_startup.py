"""
Start-up mistakes are one line on stderr and a failing exit status, under
`twistd -n livemap` as under the `livemap` command: a busy port, a bad
option value, a TLS key that cannot be read. No usage text, no traceback.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, twistd_command


def livemap_command(*args: str) -> list[str]:
    command = shutil.which("livemap")
    assert command is not None, "the livemap command is not installed (scripts/install)"
    return [command, *args]


COMMANDS = {"twistd": twistd_command, "livemap": livemap_command}


def start(how: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(COMMANDS[how](*args), capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("livemap: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stdout and "Usage:" not in result.stdout, result.stdout


@pytest.mark.parametrize("how, option", [("twistd", "--port"), ("livemap", "--port"),
                                         ("livemap", "--pirate")])
def test_a_busy_port_says_which_and_what_to_do(tmp_path: Path, how: str, option: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = "tcp:0:interface=127.0.0.1"
        taken = f"tcp:{port}:interface=127.0.0.1"
        result = start(how, tmp_path, "--port", taken if option == "--port" else free,
                       "--pirate", taken if option == "--pirate" else "none")
    assert_one_line(result, f"port {port} on 127.0.0.1 is already in use", option)


@pytest.mark.parametrize("how, args, words", [
    ("twistd", ["--rate", "fast"], ["--rate must be a number, not 'fast'", "--help"]),
    ("livemap", ["--rate", "fast"], ["--rate must be a number, not 'fast'", "--help"]),
    ("livemap", ["--workers", "0"], ["--workers"]),
    ("livemap", ["--no-such-option"], ["no-such-option"]),
    ("twistd", ["--port", "tcp:notaport"], ["--port", "notaport"]),
])
def test_a_bad_option_is_one_line_not_the_whole_help(tmp_path: Path, how: str, args: list[str],
                                                     words: list[str]) -> None:
    assert_one_line(start(how, tmp_path, *args), *words)


@pytest.mark.parametrize("how", sorted(COMMANDS))
def test_a_missing_tls_key_is_named(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "missing-key.pem"
    result = start(how, tmp_path, "--port", f"ssl:0:privateKey={missing}", "--pirate", "none")
    assert_one_line(result, "--port", f"cannot read {missing}", "No such file or directory")


@pytest.mark.parametrize("how", ["livemap"])
def test_a_key_that_is_not_a_key_is_named(tmp_path: Path, how: str) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    result = start(how, tmp_path, "--port", f"ssl:0:privateKey={key}", "--pirate", "none")
    assert_one_line(result, "--port", "bad endpoint")


def test_a_folder_given_as_the_key_cannot_be_read(tmp_path: Path) -> None:
    """Unreadable for anyone, root included (the tests may run as root)."""
    result = start("livemap", tmp_path, "--port", f"ssl:0:privateKey={tmp_path}",
                   "--pirate", "none")
    assert_one_line(result, f"cannot read {tmp_path}", "Is a directory")


def test_help_and_version_still_answer_with_status_0(tmp_path: Path) -> None:
    helped = start("livemap", tmp_path, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: livemap [options]")
    assert start("livemap", tmp_path, "--version").stdout.startswith("livemap ")


def test_options_parsed_alone_still_raise_usage_errors() -> None:
    """Outside twistd (tests, tools) a bad value stays a UsageError to catch."""
    from twisted.python import usage

    from livemap_tx.service import Options
    with pytest.raises(usage.UsageError, match="--rate"):
        Options().parseOptions(["--rate", "fast"])


def test_redis_out_of_reach_at_start_is_one_line_and_the_node_serves_alone(
        tmp_path: Path) -> None:
    """
    Not a reason to stop (docs/deployment.md: the node serves its own clients
    and keeps trying), but one line on stderr says so at once.
    """
    closed = free_port()  # nothing listens there
    port = free_port()
    process = subprocess.Popen(
        livemap_command("--port", f"tcp:{port}:interface=127.0.0.1", "--pirate", "none",
                        "--redis", f"redis://127.0.0.1:{closed}/"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # within the start's wait for Redis (3 s)
        assert line == (f"livemap: cannot reach Redis at redis://127.0.0.1:{closed}/0 yet: "
                        f"serving this node's clients alone and retrying (check --redis)\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            assert answer.status == 200 and answer.read().startswith(b"degraded")
    finally:
        process.terminate()
        rest = process.communicate(timeout=30)[1]
    assert rest == "", rest  # one line only, nothing at the stop either
