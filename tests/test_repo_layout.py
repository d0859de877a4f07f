"""
The repository stands on its own and its map is true: every file the docs
link to is in a clone, nothing refers to files outside it, every module of
livemap_tx is in docs/architecture.md's table, and the imports between
modules have no cycle and point down the layers that page lists.
"""

from __future__ import annotations

import ast
import posixpath
import re
import subprocess
from pathlib import Path
from typing import Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "livemap_tx"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def tracked_files() -> list[str]:
    """What a clone holds: the files git tracks (and new ones it would track)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    return sorted(name for name in listed if name and (ROOT / name).is_file())


def text_files() -> dict[str, str]:
    """The tracked files that are text, outside the vendored libraries."""
    texts = {}
    for name in tracked_files():
        if name.startswith("web/vendor/") or "/node_modules/" in name:
            continue
        data = (ROOT / name).read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


# Links in the docs


LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
HEADING = re.compile(r"^#{1,6} +(.*?) *$", re.MULTILINE)


def anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, no punctuation, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(texts: dict[str, str], files: Iterable[str]) -> list[str]:
    present = set(files)
    folders = {str(Path(name).parent) for name in present}
    while any(str(Path(folder).parent) not in folders for folder in folders):
        folders |= {str(Path(folder).parent) for folder in folders}
    broken = []
    for name, text in texts.items():
        if not name.endswith(".md"):
            continue
        for found in LINK.finditer(text):
            target = found.group(1) or found.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:...
                continue
            path, _, fragment = target.partition("#")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), path)) if path else name
            if resolved not in present and resolved.rstrip("/") not in folders:
                broken.append(f"{name}: {target} (no {resolved} in the repository)")
            elif fragment and resolved.endswith(".md"):
                ids = {anchor(heading) for heading in HEADING.findall(texts.get(resolved, ""))}
                if fragment not in ids:
                    broken.append(f"{name}: {target} (no heading #{fragment} in {resolved})")
    return broken


def outside_references(texts: dict[str, str], files: Iterable[str]) -> list[str]:
    """Lines naming the docs folder beside the project, or a .md file no clone has."""
    beside = "../" + "shared"  # spelled apart so that this file does not match itself
    names = {Path(name).name for name in files}
    present = set(files)
    found = []
    for name, text in texts.items():
        if name == "tests/test_repo_layout.py" or name.startswith("tests/apps/"):
            continue  # this file's own examples; third-party samples citing their sources
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{name}:{number}: {line.strip()[:100]}"
            if beside in line or re.search(r"(?<![\w./-])" + "shared/" + r"[A-Z]+\.md", line):
                found.append(where)
                continue
            for path in re.findall(r"(?<![\w./-])docs/[\w./-]*\.md\b", line):
                if path not in present:
                    found.append(where)
            for base in re.findall(r"(?<![\w./-])([\w-]+\.md)\b", line):
                if base not in names:
                    found.append(where)
    return found


def test_every_file_and_heading_the_docs_link_to_is_in_the_repository() -> None:
    assert broken_links(text_files(), tracked_files()) == []


def test_nothing_refers_to_files_outside_the_repository() -> None:
    assert outside_references(text_files(), tracked_files()) == []


def test_the_link_checks_can_fail() -> None:
    files = ["README.md", "docs/protocol.md"]
    texts = {"README.md": "[p](docs/protocol.md#messages) [x](docs/missing.md) "
                          "[y](docs/protocol.md#nowhere) [z](https://example.org/a.md)",
             "docs/protocol.md": "# Title\n## Messages\n"}
    assert broken_links(texts, files) == [
        "README.md: docs/missing.md (no docs/missing.md in the repository)",
        "README.md: docs/protocol.md#nowhere (no heading #nowhere in docs/protocol.md)"]
    texts = {"a.py": "# see " + "../" + "shared/" + "PROTOCOL.md\n# see docs/PROTOCOL.md\n"
                     "# docs/protocol.md and README.md\n# DESIGN.md"}
    assert outside_references(texts, files) == [
        "a.py:1: # see " + "../" + "shared/" + "PROTOCOL.md", "a.py:2: # see docs/PROTOCOL.md",
        "a.py:4: # DESIGN.md"]


# The module table


def modules() -> dict[str, Path]:
    """Every module of livemap_tx by dotted name (packages by their own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def section(text: str, title: str) -> str:
    text = "\n" + text
    start = text.index("\n## " + title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def table_paths(text: str) -> dict[str, str]:
    """The first cell of each table row that names a path in backquotes, and its row."""
    rows = {}
    for line in text.splitlines():
        found = re.match(r"^\| *`([^`]+)` *\|", line)
        if found:
            rows[found.group(1)] = line
    return rows


def missing_from_table(architecture: str, names: dict[str, Path]) -> list[str]:
    """
    Modules the table of "## Modules" does not name: each file by its path,
    or inside a package whose row links to a doc of its own that lists it
    (livemap_tx/sockjs/ and docs/sockjs.md).
    """
    rows = table_paths(section(architecture, "Modules"))
    missing = []
    for name, path in names.items():
        relative = path.relative_to(ROOT).as_posix()
        if relative in rows or name == "livemap_tx":
            continue
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        row = rows.get(folder)
        if row is not None and path.name == "__init__.py":
            continue
        if row is not None:
            docs = re.findall(r"docs/[\w-]+\.md", row)
            if any(f"| `{path.name}` |" in (ROOT / doc).read_text() for doc in docs):
                continue
        missing.append(relative)
    return missing


def test_every_module_is_in_the_architecture_table() -> None:
    assert missing_from_table(ARCHITECTURE.read_text(), modules()) == []


def test_the_architecture_table_names_only_files_that_exist() -> None:
    rows = table_paths(section(ARCHITECTURE.read_text(), "Modules"))
    assert [path for path in rows if not (ROOT / path).exists()] == []


def test_the_table_check_can_fail() -> None:
    names = {"livemap_tx.hub": PACKAGE / "hub.py", "livemap_tx.wire": PACKAGE / "wire.py",
             "livemap_tx.sockjs.frames": PACKAGE / "sockjs" / "frames.py",
             "livemap_tx.sockjs.nothing": PACKAGE / "sockjs" / "nothing.py"}
    text = ("## Modules\n| module | owns |\n| --- | --- |\n| `livemap_tx/hub.py` | pins |\n"
            "| `livemap_tx/sockjs/` | SockJS (docs/sockjs.md) |\n## Next\n| `livemap_tx/wire.py` | |")
    assert missing_from_table(text, names) == ["livemap_tx/wire.py",
                                               "livemap_tx/sockjs/nothing.py"]


# Imports and layers


def type_only(tree: ast.AST) -> set[int]:
    """
    The nodes under `if TYPE_CHECKING:`: imports for annotations only, never
    run, so they make no import order (import-linter leaves them out the
    same way). The hub's layers use them to annotate `self` as the whole
    MapState they make up.
    """
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                skipped.update(id(inner) for inner in ast.walk(statement))
    return skipped


def imports_of(path: Path, name: str) -> set[str]:
    """The livemap_tx modules a module imports, anywhere in it (functions too), but for annotations."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from package import module` imports the module.
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known
                       else module for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # A package's own modules may use it (it is imported first anyway).
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: imports_of(path, name) for name, path in modules().items()}


def layers(architecture: str) -> dict[str, int]:
    """Layer of each name in "## Layers": `name` a module, `name/` a package and its modules."""
    found = {}
    for number, names in re.findall(r"^(\d+)\. ((?:.*\n)(?: {3}.*\n)*)",
                                    section(architecture, "Layers") + "\n", re.MULTILINE):
        for entry in re.findall(r"`([\w./]+)`", names):
            found["livemap_tx." + entry.rstrip("/").replace("/", ".") + ("/" * entry.endswith("/"))
                  ] = int(number)
    return found


def layer_of(name: str, placed: dict[str, int]) -> Optional[int]:
    if name in placed:
        return placed[name]
    for entry, number in placed.items():
        if entry.endswith("/") and (name == entry[:-1] or name.startswith(entry[:-1] + ".")):
            return number
    return None


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph, as the modules along it, or [] if there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def layer_problems(graph: dict[str, set[str]], placed: dict[str, int]) -> list[str]:
    problems = []
    for name in sorted(graph):
        if name == "livemap_tx":
            continue
        mine = layer_of(name, placed)
        if mine is None:
            problems.append(f"{name} is in no layer of docs/architecture.md")
            continue
        for target in sorted(graph[name]):
            theirs = layer_of(target, placed)
            if theirs is not None and theirs > mine:
                problems.append(f"{name} (layer {mine}) imports {target} (layer {theirs})")
    found = cycle(graph)
    if found:
        problems.append("import cycle: " + " -> ".join(found))
    return problems


def test_imports_have_no_cycle_and_point_down_the_layers() -> None:
    graph = import_graph()
    assert "livemap_tx.hub" in graph["livemap_tx.transports.client"]  # the graph is read
    assert "livemap_tx.sockjs.session" in graph["livemap_tx.sockjs.transports"]
    assert layer_problems(graph, layers(ARCHITECTURE.read_text())) == []


def test_the_layer_check_can_fail() -> None:
    text = "## Layers\n1. Rules: `wire`,\n   `sockjs/`.\n2. State: `hub`.\n## Next\n"
    placed = layers(text)
    assert placed == {"livemap_tx.wire": 1, "livemap_tx.sockjs/": 1, "livemap_tx.hub": 2}
    graph = {"livemap_tx.wire": {"livemap_tx.hub"}, "livemap_tx.hub": {"livemap_tx.wire"},
             "livemap_tx.sockjs.frames": set(), "livemap_tx.extra": set()}
    assert layer_problems(graph, placed) == [
        "livemap_tx.extra is in no layer of docs/architecture.md",
        "livemap_tx.wire (layer 1) imports livemap_tx.hub (layer 2)",
        "import cycle: livemap_tx.hub -> livemap_tx.wire -> livemap_tx.hub"]


@pytest.mark.parametrize("cyclic", [False, True])
def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path, cyclic: bool) -> None:
    """Imports inside functions count: the circles this checks for were such imports."""
    source = "def f():\n    from .links import map_digest\n" if cyclic else "x = 1\n"
    path = tmp_path / "device_store.py"
    path.write_text(source)
    found = imports_of(path, "livemap_tx.cluster.device_store")
    assert found == ({"livemap_tx.cluster.links"} if cyclic else set())
