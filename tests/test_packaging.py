"""
livemap installed like real software, and what that installs.

`python -m build` makes an sdist and a wheel from a clean checkout; a wheel
built again from that sdist with no Node.js or npm on PATH is the same
wheel; a fresh venv holding only it runs `twistd -n livemap` from an empty
directory and serves the page to two real browsers. The browser libraries in
web/vendor/, and so in the wheel, are byte for byte what
web/package-lock.json pins, with their licences. The development install
(pip's default editable mode, its strict one, a plain `pip install .`)
finds the plugin without setuptools' deprecated compat mode, and gives the
`livemap` command.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

import pytest

from conftest import TwistdServer, free_port, wait_healthy
from test_browser import CHROMIUM, browser, map_name  # noqa: F401 (fixtures)
from test_browser import two_viewers_see_each_other_move_and_leave
from test_plugin import WHERE

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
NODE_TOOLS = ("node", "nodejs", "npm", "npx", "corepack")
LICENCE = re.compile(r"(?i)^licen[cs]e(\.md|\.txt)?$")
# The innermost package of a bundled source file (a source map's "sources").
BUNDLED = re.compile(r"node_modules/((?:@[^/]+/)?[^/]+)/(?!.*node_modules/)")
TIMEOUT = 600  # bounds a hang of a build or an install; they take seconds


def setup_version() -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]["version"]


VERSION = setup_version()


def run(args: list, *, cwd: Optional[Path] = None, env: Optional[dict] = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run([str(arg) for arg in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def without_node(*first: Path) -> dict[str, str]:
    """
    The environment with a PATH that has no Node.js or npm (every directory
    holding one is left out, as is this checkout's venv) and nothing that
    points Python at the checkout.
    """
    kept = [str(entry) for entry in first]
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or Path(entry).resolve().is_relative_to(ROOT):
            continue
        if any(os.path.exists(os.path.join(entry, tool)) for tool in NODE_TOOLS):
            continue
        kept.append(entry)
    path = os.pathsep.join(kept)
    for tool in NODE_TOOLS:
        assert shutil.which(tool, path=path) is None, tool
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "NODE_PATH")}
    return {**env, "PATH": path}


def copy_checkout(target: Path) -> Path:
    """What a fresh clone would hold: files git tracks or would track, none it ignores."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 cwd=ROOT).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # not a tracked file deleted in the working tree
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


# The vendored browser libraries against the lock


def lock_pins() -> dict[str, dict]:
    packages = json.loads((WEB / "package-lock.json").read_text())["packages"]
    return {key[len("node_modules/"):]: entry for key, entry in packages.items()
            if key.startswith("node_modules/") and "/node_modules/" not in key}


def tarball_files(data: bytes) -> dict[str, bytes]:
    """An npm tarball's regular files by their path in the package (npm drops the top directory)."""
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            extracted = archive.extractfile(member) if member.isfile() else None
            if extracted is not None:
                files[member.name.split("/", 1)[1]] = extracted.read()
    return files


def pinned_tarballs(names: list[str], scratch: Path) -> dict[str, dict[str, bytes]]:
    """Each package's files, from the npm tarball of the version and integrity the lock pins."""
    pins = lock_pins()
    assert not set(names) - pins.keys(), f"not in web/package-lock.json: {set(names) - pins.keys()}"
    npm = shutil.which("npm")
    assert npm is not None, "checking web/vendor/ needs npm (scripts/install --test installs it)"
    scratch.mkdir(parents=True, exist_ok=True)
    packed = run([npm, "pack", *(f"{name}@{pins[name]['version']}" for name in names), "--json",
                  "--prefer-offline", "--pack-destination", scratch], cwd=scratch)
    tarballs = {entry["name"]: scratch / entry["filename"] for entry in json.loads(packed.stdout)}
    files = {}
    for name in names:
        data = tarballs[name].read_bytes()
        algorithm, digest = pins[name]["integrity"].split("-", 1)
        assert base64.b64encode(hashlib.new(algorithm, data).digest()).decode() == digest, (
            f"npm's tarball of {name}@{pins[name]['version']} is not the one the lock pins")
        files[name] = tarball_files(data)
    return files


def vendored_tree(vendor: Path) -> dict[str, dict[str, bytes]]:
    """web/vendor/NAME/PATH by package name and path (files beside the packages, a README, aside)."""
    return {package.name: {path.relative_to(package).as_posix(): path.read_bytes()
                           for path in sorted(package.rglob("*")) if path.is_file()}
            for package in sorted(vendor.iterdir()) if package.is_dir()}


def assert_pinned(vendored: dict[str, dict[str, bytes]], where: str, scratch: Path) -> None:
    """
    Every vendored file is the file at the same path in the npm tarball the
    lock pins; every package has its licence, and so has every package the
    lock installs whose code a vendored bundle carries (its source map says).
    """
    assert {"leaflet", "sockjs-client", "uqr"} <= vendored.keys(), sorted(vendored)
    pins = lock_pins()
    tarballs = pinned_tarballs(sorted(vendored), scratch)
    for name, files in vendored.items():
        pinned = f"{name}@{pins[name]['version']}"
        assert files, f"{where}/{name} is empty"
        for path, data in files.items():
            assert path in tarballs[name], f"{where}/{name}/{path} is not in {pinned}'s tarball"
            assert data == tarballs[name][path], f"{where}/{name}/{path} is not {pinned}'s"
        assert any(LICENCE.match(path) for path in files), f"{where}/{name}: no licence"
    bundled = set()
    for files in vendored.values():
        for path, data in files.items():
            if path.endswith(".map"):
                for source in json.loads(data)["sources"]:
                    bundled.update(BUNDLED.findall(source))
    assert "url-parse" in bundled  # sockjs.min.js's bundle: the source maps are read
    for name in sorted(bundled & pins.keys()):
        assert any(LICENCE.match(path) for path in vendored.get(name, {})), (
            f"{where}: a bundle carries {name}, whose licence is not vendored (scripts/vendor)")


def test_web_vendor_is_exactly_what_the_lock_pins(tmp_path: Path) -> None:
    """web/vendor/ can be trusted: the npm tarballs of the locked versions and integrities."""
    assert_pinned(vendored_tree(WEB / "vendor"), "web/vendor", tmp_path)


def test_a_vendored_file_that_is_not_the_pinned_one_is_found(tmp_path: Path) -> None:
    """The check above can fail: one changed byte, or a file no tarball has, is caught."""
    vendored = vendored_tree(WEB / "vendor")
    changed = {**vendored, "leaflet": {**vendored["leaflet"]}}
    changed["leaflet"]["dist/leaflet.js"] += b"\n"
    with pytest.raises(AssertionError, match="dist/leaflet.js is not leaflet@"):
        assert_pinned(changed, "web/vendor", tmp_path / "changed")
    extra = {**vendored, "leaflet": {**vendored["leaflet"], "dist/extra.js": b""}}
    with pytest.raises(AssertionError, match="extra.js is not in leaflet@"):
        assert_pinned(extra, "web/vendor", tmp_path / "extra")
    unlicensed = {name: files for name, files in vendored.items() if name != "url-parse"}
    with pytest.raises(AssertionError, match="carries url-parse, whose licence is not vendored"):
        assert_pinned(unlicensed, "web/vendor", tmp_path / "unlicensed")


# Building and installing


def wheel_files(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def venv_using_these_dependencies(venv: Path) -> Path:
    """
    A fresh venv that reaches livemap's dependencies in this test run's own
    site-packages (a .pth), so that installing livemap into it with
    --no-deps takes seconds and downloads no dependency.
    """
    run([sys.executable, "-m", "venv", "--without-pip", venv])  # this run's pip installs
    [site] = (venv / "lib").glob("python3*/site-packages")
    [ours] = [entry for entry in sys.path if entry.endswith("site-packages")
              and Path(entry, "twisted").is_dir()]
    (site / "livemap-test-dependencies.pth").write_text(ours + "\n")
    return site


INSTALLS = {
    "editable": ["-e", "{checkout}"],  # pip's default editable mode
    "editable-strict": ["--config-settings", "editable_mode=strict", "-e", "{checkout}"],
    "regular": ["{checkout}"],
}


@pytest.mark.parametrize("how", sorted(INSTALLS))
def test_every_install_gives_twistd_livemap_and_the_livemap_command(tmp_path: Path,
                                                                    how: str) -> None:
    """
    `pip install -e .` (setuptools' default editable mode, reached through
    an import hook that twistd's plugin listing does not see), the strict
    editable mode and `pip install .`: in each, twistd lists livemap once,
    the `livemap` command answers, the code is the checkout's (or the
    venv's), the checkout itself is not on sys.path, and setuptools warns of
    nothing deprecated and shows no warning box.
    """
    checkout = copy_checkout(tmp_path / "checkout")
    venv = tmp_path / "venv"
    site = venv_using_these_dependencies(venv)
    args = [arg.format(checkout=checkout) for arg in INSTALLS[how]]
    installed = run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
                     "--no-deps", *args], env=without_node(venv / "bin"))
    output = installed.stdout + installed.stderr
    assert "DeprecationWarning" not in output and "DEPRECATION" not in output, output
    assert "*****" not in output, output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**without_node(venv / "bin"), "HOME": str(tmp_path)}
    where = json.loads(run([venv / "bin" / "python", "-c", WHERE], cwd=elsewhere, env=env).stdout)
    assert where["tapnames"].count("livemap") == 1, where["tapnames"]
    home = site if how == "regular" else checkout
    assert Path(where["package"]).resolve() == home / "livemap_tx" / "__init__.py"
    assert Path(where["plugin"]).resolve() == home / "twisted" / "plugins" / "livemap_plugin.py"
    assert Path(where["web_root"]).resolve() == (site / "livemap_web" if how == "regular"
                                                 else checkout / "web")
    assert str(checkout) not in [os.path.realpath(entry) for entry in where["sys_path"] if entry]
    if how != "regular":  # no twisted/__init__.py that would hide Twisted's own plugins
        assert not list(checkout.glob("build/*/twisted/__init__.py"))
        assert not list(checkout.glob("build/*/twisted/plugins/__init__.py"))
    twistd = shutil.which("twistd")
    assert twistd is not None
    listed = run([venv / "bin" / "python", twistd, "--help"], cwd=elsewhere, env=env)
    assert re.search(r"^ +livemap +Real-time live-location map", listed.stdout, re.M), listed.stdout
    helped = run([venv / "bin" / "livemap", "--help"], cwd=elsewhere, env=env)
    assert helped.stdout.startswith("Usage: livemap [options]"), helped.stdout
    assert "--port=" in helped.stdout and "--workers=" in helped.stdout
    version = run([venv / "bin" / "livemap", "--version"], cwd=elsewhere, env=env)
    assert version.stdout.startswith(f"livemap {VERSION} (Twisted "), version.stdout


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")
def test_a_wheel_built_from_the_sdist_without_npm_serves_two_browsers_from_a_fresh_venv(
        tmp_path: Path, browser, map_name: str) -> None:  # noqa: F811 (fixtures)
    """The release path: build, rebuild from the sdist without npm, install, run, two browsers."""
    checkout = copy_checkout(tmp_path / "checkout")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, checkout])
    sdist = only(sorted(dist.glob("*.tar.gz")))
    wheel = only(sorted(dist.glob("*.whl")))
    assert (sdist.name, wheel.name) == (f"livemap-{VERSION}.tar.gz",
                                        f"livemap-{VERSION}-py3-none-any.whl")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "unpacked", filter="data")
    assert not [name for name in names
                if re.search(r"node_modules|\.venv|__editable__|/build/|\.git/", name)]
    assert f"livemap-{VERSION}/web/package-lock.json" in names

    # A machine without Node.js or npm builds the same wheel from the sdist.
    no_node = without_node()
    rebuilt = tmp_path / "dist-from-sdist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", rebuilt,
         tmp_path / "unpacked" / f"livemap-{VERSION}"], env=no_node)
    contents = wheel_files(only(sorted(rebuilt.glob("*.whl"))))
    built = wheel_files(wheel)
    assert sorted(contents) == sorted(built)
    assert [name for name in contents if contents[name] != built[name]] == []

    # It holds the plugin, the code and the page, and nothing of npm's.
    assert "twisted/plugins/livemap_plugin.py" in contents
    assert not [name for name in contents if "node_modules" in name or
                (name.startswith("twisted/") and name.endswith("__init__.py"))]
    page = [checkout / "web" / "index.html", *(checkout / "web" / "static").rglob("*")]
    for path in filter(Path.is_file, page):
        name = "livemap_web/" + path.relative_to(checkout / "web").as_posix()
        assert contents.get(name) == path.read_bytes(), name
    vendored: dict[str, dict[str, bytes]] = {}
    for name, data in contents.items():
        if name.startswith("livemap_web/vendor/"):
            package, path = name[len("livemap_web/vendor/"):].split("/", 1)
            vendored.setdefault(package, {})[path] = data
    assert vendored == vendored_tree(checkout / "web" / "vendor")
    assert_pinned(vendored, "the wheel's livemap_web/vendor", tmp_path / "npm")

    # A fresh venv with only that wheel (and its dependencies), run from elsewhere.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    env = without_node(venv / "bin")
    run([venv / "bin" / "python", "-m", "pip", "install", "--no-input",
         only(sorted(rebuilt.glob("*.whl")))], env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = json.loads(run([venv / "bin" / "python", "-c", WHERE], cwd=elsewhere, env=env).stdout)
    site = venv.resolve()
    for key in ("web_root", "plugin", "package"):
        assert Path(where[key]).resolve().is_relative_to(site), where
    assert where["tapnames"].count("livemap") == 1
    assert not [entry for entry in where["sys_path"]
                if entry and Path(entry).resolve().is_relative_to(ROOT)], where["sys_path"]
    version = run([venv / "bin" / "twistd", "livemap", "--version"], cwd=elsewhere, env=env)
    assert version.stdout.startswith(f"livemap {VERSION} (Twisted "), version.stdout
    helped = run([venv / "bin" / "livemap", "--help"], cwd=elsewhere, env=env)
    assert helped.stdout.startswith("Usage: livemap [options]"), helped.stdout

    port = free_port()
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(venv / "bin" / "twistd"), "-n", "--pidfile=", "livemap",
             "--port", f"tcp:{port}:interface=127.0.0.1", "--pirate", "none"],
            cwd=elsewhere, env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=log_file, stderr=subprocess.STDOUT)
    server = TwistdServer(process, port, log_path)
    try:
        wait_healthy(f"{server.url}/healthz", process, "twistd from the wheel", server.log,
                     timeout=30)
        assert f"livemap {VERSION} starting" in server.log()
        for url_path, name in (("/vendor/leaflet/leaflet.js", "livemap_web/vendor/leaflet/dist/leaflet.js"),
                               ("/vendor/sockjs-client/sockjs.min.js",
                                "livemap_web/vendor/sockjs-client/dist/sockjs.min.js"),
                               ("/vendor/uqr/index.mjs", "livemap_web/vendor/uqr/dist/index.mjs"),
                               ("/static/app.js", "livemap_web/static/app.js")):
            with urllib.request.urlopen(server.url + url_path, timeout=10) as response:
                assert response.read() == contents[name], url_path
        two_viewers_see_each_other_move_and_leave(browser, server.url, map_name,
                                                  screenshot=tmp_path / "screenshot.png")
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()
