"""
setuptools' build backend, and one addition so that `pip install -e .`
gives a twistd that knows livemap.

twistd finds plugins by listing the folder `twisted/plugins/` under each
entry of sys.path (twisted.plugin.pluginPackagePaths), not by importing. A
wheel puts livemap_plugin.py in site-packages/twisted/plugins/, and
setuptools' strict and compat editable modes put a folder holding it on
sys.path; but its default editable mode reaches packages through an import
hook, which twistd's listing never sees. For that mode this backend adds
to the editable wheel a .pth naming a folder that holds only
twisted/plugins/livemap_plugin.py, a link to the checkout's file (in
build/, like the strict mode's link tree), so edits show at once.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 (every other hook as setuptools has it)

PLUGIN = Path("twisted", "plugins", "livemap_plugin.py")
PTH = "__editable__.livemap_twisted_plugin.pth"


def build_editable(wheel_directory: str, config_settings: Optional[dict[str, Any]] = None,
                   metadata_directory: Optional[str] = None) -> str:
    with warnings.catch_warnings():
        # setuptools' 9-line box for this mode, at every install: a folder in
        # the working directory named as a package may be imported instead.
        # Here such folders are the packages themselves, so it says nothing.
        warnings.filterwarnings("ignore", message="Editable installation")
        name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    wheel = Path(wheel_directory, name)
    if not _plugin_on_path(wheel):
        _add_file(wheel, PTH, f"{_plugin_folder()}\n".encode())
    return name


def _plugin_on_path(wheel: Path) -> bool:
    """Whether a .pth of the wheel already names a folder holding the plugin."""
    with zipfile.ZipFile(wheel) as archive:
        for entry in archive.namelist():
            if entry.endswith(".pth") and "/" not in entry:
                for line in archive.read(entry).decode().splitlines():
                    if line.strip() and not line.startswith(("import ", "import\t", "#")):
                        if (Path(line.strip()) / PLUGIN).exists():
                            return True
    return False


def _plugin_folder() -> Path:
    """build/__editable__.livemap-twisted-plugin/, holding only a link to the plugin."""
    checkout = Path.cwd().resolve()  # a PEP 517 backend runs in the project's folder
    folder = checkout / "build" / "__editable__.livemap-twisted-plugin"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / PLUGIN.parent).mkdir(parents=True)
    try:
        os.symlink(checkout / PLUGIN, folder / PLUGIN)
    except OSError:  # no symbolic links here: a copy (reinstall after editing it)
        shutil.copyfile(checkout / PLUGIN, folder / PLUGIN)
    return folder


def _add_file(wheel: Path, name: str, data: bytes) -> None:
    """Add a file to a wheel, with its line in RECORD."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(wheel) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, content in entries:
            if info.filename.endswith(".dist-info/RECORD"):
                content = content.rstrip(b"\n") + f"\n{name},sha256={digest},{len(data)}\n".encode()
                record = (info, content)
                continue
            archive.writestr(info, content)
        archive.writestr(name, data)
        archive.writestr(*record)
