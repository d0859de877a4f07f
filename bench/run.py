"""Run livemap's fan-out benchmark suite and write the table.

For every scenario and every server (livemap, the naive Autobahn broadcast,
the naive Node.js ``ws`` broadcast) this starts a fresh server on core 0,
runs ``bench/loadgen.py`` on core 1 against it over 127.0.0.1, stops the
server, and collects the generator's JSON.  With ``--out`` it writes the
Markdown report (docs/benchmarks.md); ``--json`` keeps the raw results.

    python bench/run.py --out docs/benchmarks.md
    python bench/run.py --scenario 1k-all --server livemap

Everything it starts it stops, on error and on Ctrl-C too.  The machine is
shared (two cores), so before each run it waits for the other processes to
go quiet, and every result says how busy each core was, so a number taken
while something else ran is visible as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# /proc/stat per core, read the same way the generator reads it.
from loadgen import wait_quiet

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
SERVER_CORE = 0
GENERATOR_CORE = 1
SERVERS = ("livemap", "naive-autobahn", "naive-node")
# Two independent load generators, same scenarios, same JSON: loadgen.py (raw
# sockets and epoll) and loadgen.js (Node.js clients on the ws package).
GENERATORS = ("python", "node")
# A run during which other processes used more than this (in cores) is repeated.
NOISY = 0.25
# With --livemap-commit: the tree livemap runs from (a `git archive` of that
# commit, first on its PYTHONPATH) and the commit; else the working tree.
LIVEMAP_TREE: Path | None = None
LIVEMAP_COMMIT: str | None = None


@dataclass(frozen=True)
class Scenario:
    """One load shape; its numbers go to loadgen.py unchanged."""

    name: str
    title: str
    clients: int
    movers: int = 0
    stalled: int = 0
    views: bool = False
    duration: float = 8.0
    warmup: float = 2.0
    settle: float = 1.5
    extra: tuple[str, ...] = field(default_factory=tuple)

    def loadgen_args(self) -> list[str]:
        args = [
            "--clients", str(self.clients), "--movers", str(self.movers),
            "--duration", str(self.duration), "--warmup", str(self.warmup),
            "--settle", str(self.settle), "--stalled", str(self.stalled),
        ]
        if self.views:
            args.append("--views")
        return args + list(self.extra)


SCENARIOS = [
    Scenario("idle-10k", "10,000 idle connections", 10_000),
    Scenario("100-all", "100 clients, all moving at 1 Hz", 100, 100),
    Scenario("1k-100", "1,000 clients, 100 of them moving at 1 Hz", 1_000, 100),
    Scenario("1k-all", "1,000 clients, all moving at 1 Hz", 1_000, 1_000),
    Scenario("10k-50", "10,000 clients, 50 of them moving at 1 Hz", 10_000, 50),
    Scenario("10k-100", "10,000 clients, 100 of them moving at 1 Hz", 10_000, 100),
    Scenario(
        "1k-all-stalled",
        "1k-all plus one client that never reads (SO_RCVBUF 4 KiB, no recv after welcome)",
        1_001, 1_000, stalled=1,
    ),
    Scenario(
        "views-10k",
        "10,000 clients each viewing a 10x18 degree box; 960 movers spread over the world at 1 Hz",
        10_000, 960, views=True,
    ),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(server: str, port: int) -> list[str]:
    if server == "livemap":
        # the twistd of the Python running this (a venv's), else the PATH's
        sibling = Path(sys.executable).with_name("twistd")
        twistd = str(sibling) if sibling.exists() else shutil.which("twistd") or "twistd"
        return [
            twistd, "-n", "--pidfile=", "livemap",
            "--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
            "--pirate", "none", "--tick", "0.1",
        ]
    if server == "naive-autobahn":
        return [sys.executable, str(PEERS / "naive_autobahn.py"), "--port", str(port)]
    if server == "naive-node":
        return ["node", str(PEERS / "naive_ws.js"), "--port", str(port)]
    raise ValueError(server)


def _pinned(core: int):  # type: ignore[no-untyped-def]
    """preexec_fn: pin the child to a core and give it every file descriptor allowed."""

    def setup() -> None:
        os.sched_setaffinity(0, {core})
        # Highest CFS weight: on a machine shared with other work the
        # benchmark's two processes get their cores whenever they want them.
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


class Server:
    """A server subprocess on the server core; stopped by its own pid only."""

    def __init__(self, name: str, logdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = logdir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")
        env, cwd = None, REPO
        if self.name == "livemap":
            # A store of its own (livemap's data directory, read from
            # STATE_DIRECTORY; older commits ignore it): the user's is left
            # alone, and two runs at once do not meet.
            env = dict(os.environ, STATE_DIRECTORY=str(self.log_path.with_name(f"data-{self.port}")))
        if self.name == "livemap" and LIVEMAP_TREE is not None:
            assert env is not None
            env["PYTHONPATH"] = os.pathsep.join(x for x in (str(LIVEMAP_TREE), env.get("PYTHONPATH")) if x)
            cwd = LIVEMAP_TREE
        self.proc = subprocess.Popen(
            server_command(self.name, self.port), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_pinned(SERVER_CORE), env=env,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                time.sleep(0.5)  # let it finish starting before its RSS is read
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port}; see {self.log_path}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def generator_command(generator: str) -> list[str]:
    if generator == "python":
        return [sys.executable, str(HERE / "loadgen.py")]
    if generator == "node":
        return ["node", str(HERE / "loadgen.js")]
    raise ValueError(generator)


def run_one(scenario: Scenario, server_name: str, logdir: Path, quiet_wait: float,
            generator: str = "python", gen_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One scenario against one fresh server; returns the generator's result."""
    background = wait_quiet(quiet_wait)
    server = Server(server_name, logdir)
    try:
        server.start()
        assert server.proc is not None
        cmd = [
            *generator_command(generator), "--port", str(server.port),
            "--server-pid", str(server.proc.pid), "--map", f"bench-{scenario.name}",
            *scenario.loadgen_args(), *gen_args,
        ]
        started = time.monotonic()
        gen = subprocess.run(
            cmd, cwd=REPO, capture_output=True, timeout=300, preexec_fn=_pinned(GENERATOR_CORE),
        )
        if gen.returncode != 0:
            raise RuntimeError(f"{generator} generator failed ({gen.returncode}): {gen.stderr.decode()[-2000:]}")
        result = json.loads(gen.stdout.decode().strip().splitlines()[-1])
        result["run_s"] = round(time.monotonic() - started, 1)
        alive = server.proc.poll() is None
    finally:
        server.stop()
    result.update(scenario=scenario.name, server=server_name, generator=generator,
                  background_before=background, server_survived=alive)
    if gen_args:
        result["generator_args"] = list(gen_args)
    result["saturated"] = saturated(result)
    result["others_cpu"] = others_cpu(result)
    return result


def _cores(r: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in (r.get("core_busy") or {}).items() if k[4:].isdigit()}


def others_cpu(r: dict[str, Any]) -> float:
    """CPU (in cores) used on the two cores outside the two benchmark
    processes: other work on the shared machine, and the kernel work done
    while both processes slept (a few hundredths of a core when quiet).
    Core busy time is wall time minus idle (exact); process time is exact."""
    total = sum(_cores(r).values())
    return round(max(0.0, total - r.get("server_cpu_frac", 0.0) - r.get("gen_cpu_frac", 0.0)), 3)


def saturated(r: dict[str, Any]) -> str:
    """Which side ran out of CPU: a side whose process used 90 % of a core,
    or whose core was busy 97 % of the window while other work was small.
    Process time includes the softirq network work done in the process's
    context (loopback delivery of what it sends), so adding the core's
    softirq share to it, as this did before, counted that work twice."""
    busy = _cores(r)
    quiet = others_cpu(r) <= NOISY
    server = (r.get("server_cpu_frac", 0.0) >= 0.9
              or (quiet and busy.get(f"core{SERVER_CORE}", 0.0) >= 0.97))
    generator = (r.get("gen_cpu_frac", 0.0) >= 0.9
                 or (quiet and busy.get(f"core{GENERATOR_CORE}", 0.0) >= 0.97))
    if server and generator:
        return "both"
    return "server" if server else "generator" if generator else "neither"


# -- the report ---------------------------------------------------------------


def _fmt(value: Any, spec: str = "", none: str = "–") -> str:
    if value is None:
        return none
    return format(value, spec) if spec else str(value)


def _gen(r: dict[str, Any]) -> str:
    return r.get("generator", "python")


def pins_per_cpu_second(r: dict[str, Any]) -> float | None:
    us = r.get("server_cpu_us_per_pin")
    if us:
        return 1e6 / us
    if r.get("movers") and r.get("delivered") == 0 and r.get("server_cpu_s", 0) > 0:
        return 0.0  # burnt CPU and delivered nothing (a collapsed naive peer)
    return None


def pins_per_core_second(r: dict[str, Any]) -> float | None:
    """Pin states per second of the server core's busy time (process plus the
    kernel work done on its core outside it)."""
    core = (r.get("core_busy") or {}).get(f"core{SERVER_CORE}")
    if not core or not r.get("delivered_per_s"):
        return None
    return r["delivered_per_s"] / core


def scenario_table(rows: list[dict[str, Any]]) -> list[str]:
    rows = sorted(rows, key=lambda r: (SERVERS.index(r["server"]) if r["server"] in SERVERS else 9,
                                       GENERATORS.index(_gen(r)) if _gen(r) in GENERATORS else 9))
    if rows and not rows[0].get("movers"):
        lines = [
            "| server | generator | connected | RSS before → after (MB) | RSS per connection (KB) | server CPU idle (cores) | generator CPU | connect time (s) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r['server']} | {_gen(r)} | {r['connected']:,} | {r['rss_before_kb'] / 1024:.1f} → {r['rss_connected_kb'] / 1024:.1f}"
                f" | {r['rss_per_conn_kb']:.1f} | {_fmt(r.get('server_cpu_frac'), '.2f')} | {_fmt(r.get('gen_cpu_frac'), '.2f')}"
                f" | {r['connect_s']:.1f} |"
            )
        return lines
    lines = [
        "| server | generator | delivered pin states/s | p50 ms | p99 ms | server CPU (cores) | server core busy (cores)"
        " | server CPU µs / pin state | pin states per server CPU-second | per server core-second | RSS / conn (KB)"
        " | converged (wrong clients) | generator CPU (cores) | generator core busy | other work (cores) | saturated |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        busy = r.get("core_busy") or {}
        pps = pins_per_cpu_second(r)
        conv = ("yes" if r.get("converged") else "**no**") + f" ({r.get('wrong_clients')})"
        lines.append(
            f"| {r['server']} | {_gen(r)} | {r['delivered_per_s']:,.0f} | {_fmt(r.get('p50_ms'), '.1f')} | {_fmt(r.get('p99_ms'), '.1f')}"
            f" | {r['server_cpu_frac']:.2f} | {_fmt(busy.get(f'core{SERVER_CORE}'), '.2f')}"
            f" | {_fmt(r.get('server_cpu_us_per_pin'), '.2f')} | {_fmt(pps, ',.0f')} | {_fmt(pins_per_core_second(r), ',.0f')}"
            f" | {r['rss_per_conn_end_kb']:.1f} | {conv} | {r['gen_cpu_frac']:.2f} | {_fmt(busy.get(f'core{GENERATOR_CORE}'), '.2f')}"
            f" | {r.get('others_cpu', 0):.2f} | {r['saturated']} |"
        )
    return lines


def _get(results: list[dict[str, Any]], scenario: str, server: str,
         generator: str = "python") -> dict[str, Any] | None:
    for r in results:
        if r["scenario"] == scenario and r["server"] == server and _gen(r) == generator:
            return r
    return None


def _generators(results: list[dict[str, Any]]) -> list[str]:
    present = {_gen(r) for r in results}
    return [g for g in GENERATORS if g in present]


def targets(results: list[dict[str, Any]], generator: str = "python") -> list[str]:
    """The standing targets, each with the figure it was judged on."""
    out: list[str] = []

    def line(ok: bool | None, text: str) -> None:
        mark = "not measured" if ok is None else ("met" if ok else "**not met**")
        out.append(f"- {mark}: {text}")

    def get(scenario: str, server: str = "livemap") -> dict[str, Any] | None:
        return _get(results, scenario, server, generator)

    r = get("idle-10k")
    line(None if r is None else r["rss_per_conn_kb"] <= 25 and r["connected"] == 10_000,
         "10,000 idle WebSocket connections at ≤ 25 KB RSS each"
         + ("" if r is None else f" — {r['connected']:,} connected, {r['rss_per_conn_kb']:.1f} KB each"))
    r = get("1k-all")
    line(None if r is None else (r["p99_ms"] or 1e9) < 250 and r["converged"] and r["server_cpu_frac"] <= 1.0,
         "1,000 clients all moving at 1 Hz: p99 < 250 ms, all converged, ≤ one core"
         + ("" if r is None else f" — p99 {_fmt(r['p99_ms'], '.1f')} ms, converged {r['converged']}"
            f" ({r['wrong_clients']} wrong), {r['server_cpu_frac']:.2f} cores"))
    r = get("10k-100")
    line(None if r is None else (r["p99_ms"] or 1e9) < 500 and r["converged"],
         "10,000 clients with 100 moving at 1 Hz: p99 < 500 ms, converged"
         + ("" if r is None else f" — p99 {_fmt(r['p99_ms'], '.1f')} ms, converged {r['converged']} ({r['wrong_clients']} wrong),"
            f" server {r['server_cpu_frac']:.2f} cores, its core busy {_fmt((r.get('core_busy') or {}).get(f'core{SERVER_CORE}'), '.2f')}"
            f" (saturated: {r['saturated']})"))
    base, st = get("1k-all"), get("1k-all-stalled")
    if base is None or st is None:
        line(None, "stalled reader: server memory bounded and others' p99 within 10% of the run without it")
    else:
        grow = (st["rss_end_kb"] - base["rss_end_kb"]) / 1024
        ratio = (st["p99_ms"] or 0) / (base["p99_ms"] or 1)
        line(grow < 16 and ratio <= 1.10 and st["server_survived"],
             "stalled reader: server memory bounded and others' p99 within 10% of the run without it"
             f" — RSS at end {st['rss_end_kb'] / 1024:.1f} MB vs {base['rss_end_kb'] / 1024:.1f} MB without it"
             f" (peak {st['rss_peak_kb'] / 1024:.1f} MB), p99 {_fmt(st['p99_ms'], '.1f')} ms vs {_fmt(base['p99_ms'], '.1f')} ms"
             f" ({ratio:.2f}×)")
    for s in SCENARIOS:
        if not s.movers or s.clients < 1_000:
            continue
        lm, ab, nd = (get(s.name, x) for x in SERVERS)
        if lm is None or ab is None:
            line(None, f"{s.name}: ≥ 5× naive Autobahn's pin states per server CPU-second")
        else:
            a, b = pins_per_cpu_second(lm), pins_per_cpu_second(ab)
            ratio = (a / b if b else float("inf")) if a and b is not None else None
            line(ratio is not None and ratio >= 5,
                 f"{s.name}: ≥ 5× naive Autobahn's pin states per server CPU-second — "
                 f"{_fmt(a, ',.0f')} vs {_fmt(b, ',.0f')} "
                 + ("(it delivered nothing)" if ratio == float("inf") else f"({_fmt(ratio, '.1f')}×)"))
        if lm is not None and nd is not None:
            a, c = pins_per_cpu_second(lm), pins_per_cpu_second(nd)
            line(bool(a and c and a > c),
                 f"{s.name}: ahead of the naive Node server — {_fmt(a, ',.0f')} vs {_fmt(c, ',.0f')} pin states per CPU-second")
    return out


def issue15_targets(results: list[dict[str, Any]], generator: str) -> list[str]:
    """Issue 15's targets, to be met on both generators."""
    out: list[str] = []

    def line(ok: bool | None, text: str) -> None:
        mark = "not measured" if ok is None else ("met" if ok else "**not met**")
        out.append(f"- {mark}: {text}")

    for name in ("1k-100", "10k-50"):
        r = _get(results, name, "livemap", generator)
        pps = None if r is None else pins_per_cpu_second(r)
        line(None if r is None else bool(pps and pps >= 1_000_000 and r["converged"]),
             f"{name}: ≥ 1,000,000 pin states per server CPU-second"
             + ("" if r is None else f" — {_fmt(pps, ',.0f')} (per server core-second {_fmt(pins_per_core_second(r), ',.0f')}),"
                f" converged {r['converged']}"))
    for name, bound in (("1k-100", 150), ("1k-all", 150), ("10k-50", 250), ("10k-100", 250)):
        r = _get(results, name, "livemap", generator)
        line(None if r is None else (r["p99_ms"] or 1e9) <= bound and r["converged"],
             f"{name}: p99 ≤ {bound} ms" + ("" if r is None else f" — {_fmt(r['p99_ms'], '.1f')} ms"))
    r = _get(results, "idle-10k", "livemap", generator)
    line(None if r is None else r["rss_per_conn_kb"] <= 8 and r["connected"] == 10_000,
         "10,000 idle connections at ≤ 8 KB RSS each"
         + ("" if r is None else f" — {r['connected']:,} connected, {r['rss_per_conn_kb']:.1f} KB each"))
    return out


def machine_facts() -> list[str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            return "not found"

    import autobahn
    import numpy
    import orjson
    import twisted

    ws_version = "not installed"
    try:
        ws_version = json.loads((PEERS / "node_modules" / "ws" / "package.json").read_text())["version"]
    except OSError:
        pass
    mem_kb = 0
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return [
        f"- nproc: {os.cpu_count()}; CPU: {model}; memory: {mem_kb / 1024 / 1024:.0f} GiB",
        f"- kernel: {platform.release()}",
        f"- Python {platform.python_version()}, Twisted {twisted.__version__}, Autobahn {autobahn.__version__},"
        f" orjson {orjson.__version__}, numpy {numpy.__version__}",
        f"- Node.js {version(['node', '--version'])}, ws {ws_version}",
        (f"- livemap at commit {LIVEMAP_COMMIT} (run from a `git archive` of it, not the working tree)"
         if LIVEMAP_COMMIT else
         f"- livemap at commit {version(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'])}"
         + (" with uncommitted changes in livemap_tx/" if version(['git', '-C', str(REPO), 'status', '--porcelain', 'livemap_tx']) else "")),
    ]


def render(results: list[dict[str, Any]], argv: list[str], elapsed: float,
           facts: list[str] | None = None) -> str:
    lines = [
        "# livemap fan-out benchmark",
        "",
        "Produced by `bench/run.py` (method and tools: `bench/README.md`). Each row is one run of",
        "one scenario against one freshly started server: the server pinned to core 0, one load",
        "generator process pinned to core 1, all traffic over 127.0.0.1 with real WebSocket frames of",
        "livemap's protocol. There are two independent generators: *python* (`bench/loadgen.py`, raw",
        "sockets and epoll) and *node* (`bench/loadgen.js`, Node.js clients on the `ws` package);",
        "they share no code, and both read every socket as soon as it is readable. Latency is",
        "from the moment a move was written by its sender to the moment each client read the pin",
        "state carrying that move's `seq`, over every delivered pin state of moves sent in the",
        "measured window (the run's moving time less a 2 s warm-up). p50 is the median of one run.",
        "",
        "## Command",
        "",
        "```",
        "# from the repository root, with livemap installed (pip install -e .)",
        "npm ci --prefix bench/peers   # ws, for the naive Node peer and the Node generator (run.py does it if missing)",
        "python " + " ".join(["bench/run.py", *argv]),
        "```",
        "",
        f"The suite took {elapsed / 60:.1f} minutes. Servers were started as:",
        "",
        "```",
        "nice -n -20 taskset -c 0 twistd -n --pidfile= livemap --port tcp:PORT:interface=127.0.0.1:backlog=4096 --pirate none --tick 0.1",
        "nice -n -20 taskset -c 0 python bench/peers/naive_autobahn.py --port PORT",
        "nice -n -20 taskset -c 0 node bench/peers/naive_ws.js --port PORT",
        "nice -n -20 taskset -c 1 python bench/loadgen.py --port PORT --server-pid PID --map bench-SCENARIO "
        "--clients N --movers M --duration 8 --warmup 2 --settle 1.5 --stalled S [--views]",
        "nice -n -20 taskset -c 1 node bench/loadgen.js (the same arguments)",
        "```",
        "",
        "## Machine",
        "",
        *(facts if facts is not None else machine_facts()),
        "",
        "## Columns",
        "",
        "- *delivered pin states/s*: pins in `update` frames read by clients in the measured window, per second.",
        "- *server CPU*: utime+stime of the server process from /proc/PID/stat over the window, in cores (exact:",
        "  the kernel scales them to the scheduler's run time). On this kernel it includes the softirq network work",
        "  done in the server's context, which on loopback is also the delivery of what it sends into the clients'",
        "  sockets. *µs / pin state* divides it by the delivered pin states; *pin states per server CPU-second* is",
        "  the inverse, and what the targets are judged on.",
        "- *server core busy*: wall time minus idle time of core 0 (idle is measured exactly; the per-core user,",
        "  system and softirq figures are sampled by the 250 Hz tick and miss short bursts, so they are not used for",
        "  totals): the server plus the kernel work done on its core outside it (timers, softirq while it sleeps),",
        "  plus anything else that ran there. *per server core-second* divides the delivered pin states by it.",
        "- *RSS / conn*: (server RSS at the end of the window − RSS before any connection) ÷ connections.",
        "- *converged*: after the last move, up to 1.5 s (the protocol's 1 s plus margin), every client's set",
        "  of pins and latest `seq` per pin equal what the generator last sent (within the client's view);",
        "  in brackets the number of clients still wrong. The stalled client is left out.",
        "- *generator CPU*: the load generator's own utime+stime over the window, in cores (all its threads);",
        "  *generator core busy* is core 1's busy time, measured like the server's.",
        "- *saturated* names the side whose process used 90 % of a core, or whose core was busy 97 % of the",
        "  window on an otherwise quiet machine (core 0: server, core 1: generator); *neither* means both kept up.",
        "- *other work*: busy time of the two cores less the two processes' CPU: other processes (the machine is",
        "  shared; both run at nice −20, run.py waits for quiet before each run and repeats a run during",
        "  which other work took over a quarter of a core) and kernel work done while both slept.",
        "- Latency counts pin states delivered by the end of the settle time; where a server fell behind,",
        "  the states it never delivered are not in p50/p99 (the notes give the share that was).",
        "",
        "## Results",
        "",
    ]
    for s in SCENARIOS:
        rows = [r for r in results if r["scenario"] == s.name]
        if not rows:
            continue
        lines += [f"### {s.name}: {s.title}", "", *scenario_table(rows), ""]
        notes = []
        for r in rows:
            extra = []
            if r.get("movers") and r.get("moves_sent", 0) < 0.98 * r.get("moves_scheduled", 0):
                extra.append(f"generator sent {r['moves_sent']:,} of {r['moves_scheduled']:,} scheduled moves")
            if r.get("errors"):
                extra.append(f"error frames {r['errors']}")
            if r.get("closed_by_server"):
                extra.append(f"{r['closed_by_server']} connections closed by the server")
            if r.get("connect_failures"):
                extra.append(f"{r['connect_failures']} connections failed")
            if r.get("disorder"):
                extra.append(f"{r['disorder']} deliveries older than a state already seen")
            if r.get("saturated") in ("generator", "both"):
                if _gen(r) == "node":
                    extra.append(f"the generator was busy too; its event loop was late by up to {r.get('gen_max_batch_ms')} ms"
                                 " (its latencies include that wait)")
                else:
                    extra.append(f"the generator was busy too; its longest poll batch took {r.get('gen_max_batch_ms')} ms"
                                 " (no ready socket waited longer to be read)")
            if r.get("others_cpu", 0) > NOISY:
                extra.append(f"other work took {r['others_cpu']:.2f} cores during this run even after"
                             f" {r.get('attempts', 1)} attempts: treat its latency with care")
            if not r.get("server_survived", True):
                extra.append("server died during the run")
            exp, got = r.get("expected_samples"), r.get("latency_samples")
            if exp and got is not None and got < 0.95 * exp:
                extra.append(f"latency over {got / exp:.0%} of the {exp:,} pin states sent in the window"
                             " (the rest coalesced or never delivered)")
            if r.get("views"):
                extra.append(f"{r.get('pins_per_view_mean')} pins per view on average; only pins inside"
                             " the receiver's box count as delivered")
            if r.get("stalled"):
                extra.append(f"server RSS peak {r['rss_peak_kb'] / 1024:.1f} MB, at end {r['rss_end_kb'] / 1024:.1f} MB")
            if extra:
                notes.append(f"- {r['server']} ({_gen(r)} generator): " + "; ".join(extra))
        if notes:
            lines += notes + [""]
    lines += like_for_like(results)
    for g in _generators(results):
        lines += [f"## Targets (livemap, {g} generator)", "", *targets(results, g), "",
                  f"### Issue 15 targets ({g} generator)", "", *issue15_targets(results, g), ""]
    return "\n".join(lines)


def like_for_like(results: list[dict[str, Any]]) -> list[str]:
    """Compare with each naive peer at its cheapest, not only at its collapse
    (on the python generator's runs, or the node one's if there are no others)."""
    gens = _generators(results)
    if not gens:
        return []
    results = [r for r in results if _gen(r) == gens[0]]
    best: dict[str, float] = {}
    where: dict[str, str] = {}
    for r in results:
        pps = pins_per_cpu_second(r)
        if r["server"] != "livemap" and pps and not r.get("views") and pps > best.get(r["server"], 0.0):
            best[r["server"]] = pps
            where[r["server"]] = r["scenario"]
    if not best:
        return []
    peers = [p for p in SERVERS if p in best]
    lines = [
        f"## Naive peers under overload ({gens[0]} generator)",
        "",
        "A naive peer offered more than one core can send keeps framing messages for every client, and",
        "they wait in its buffers (Twisted's write buffers in the Autobahn peer: its RSS grows) while the",
        "clients receive a trickle. A ratio against such a run measures that collapse, not the cost of",
        "one send. So here livemap is also compared with each peer at its cheapest: the most pin states",
        "per server CPU-second it reached in any scenario of this run without views ("
        + ", ".join(f"{p}: {best[p]:,.0f} in {where[p]}" for p in peers) + ").",
        "In views-10k this comparison does not apply: the peers have no views, so they must send every",
        "pin to every client, and almost none of what they send is wanted.",
        "",
        "| scenario | livemap pin states per CPU-second | " + " | ".join(f"vs {p} at its cheapest" for p in peers) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in peers) + " |",
    ]
    for s in SCENARIOS:
        lm = _get(results, s.name, "livemap", gens[0])
        if lm is None or not s.movers or s.views:
            continue
        a = pins_per_cpu_second(lm)
        cells = [f"{a / best[p]:.1f}×" if a else "–" for p in peers]
        lines.append(f"| {s.name} | {_fmt(a, ',.0f')} | " + " | ".join(cells) + " |")
    return lines + [""]


def ensure_node_peer() -> None:
    if not (PEERS / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PEERS, check=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="livemap fan-out benchmark suite")
    p.add_argument("--scenario", action="append", help=f"one of {', '.join(BY_NAME)} (repeatable; default all)")
    p.add_argument("--server", action="append", choices=SERVERS, help="repeatable; default all three")
    p.add_argument("--generator", action="append", choices=GENERATORS,
                   help="load generator: python (bench/loadgen.py) or node (bench/loadgen.js);"
                   " repeatable; default both")
    p.add_argument("--gen-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the generator, e.g. --gen-arg=--read-pace-ms=2 (repeatable;"
                   " for experiments: the report names them)")
    p.add_argument("--out", type=Path, help="write the Markdown report here")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="seconds to wait for the machine to go quiet before each run")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds the whole suite may spend waiting for quiet and repeating noisy runs")
    p.add_argument("--retries", type=int, default=2,
                   help=f"times to repeat a run during which other work used over {NOISY} cores")
    p.add_argument("--livemap-commit", metavar="REV",
                   help="run livemap from a `git archive` of this commit instead of the working tree"
                   " (to measure committed code while others edit, or to compare two commits)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only write the report again from the raw results of an earlier --json")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        report = render(saved["results"], saved["argv"], saved["elapsed_s"], saved.get("machine"))
        if args.out:
            args.out.write_text(report)
        else:
            sys.stdout.write(report)
        return
    # a SIGTERM unwinds like Ctrl-C, so every `finally` stops its server
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    names = args.scenario or list(BY_NAME)
    for n in names:
        if n not in BY_NAME:
            p.error(f"unknown scenario {n!r}; known: {', '.join(BY_NAME)}")
    servers = args.server or list(SERVERS)
    generators = args.generator or list(GENERATORS)
    if "naive-node" in servers or "node" in generators:
        ensure_node_peer()
    logdir = Path(tempfile.mkdtemp(prefix="livemap-bench-"))
    if args.livemap_commit:
        global LIVEMAP_TREE, LIVEMAP_COMMIT
        LIVEMAP_COMMIT = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", f"{args.livemap_commit}^{{commit}}"],
            capture_output=True, text=True, check=True).stdout.strip()
        LIVEMAP_TREE = logdir / f"livemap-{LIVEMAP_COMMIT}"
        LIVEMAP_TREE.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", LIVEMAP_COMMIT],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(LIVEMAP_TREE)], input=archive, check=True)
    results: list[dict[str, Any]] = []
    extra = 0.0
    facts = machine_facts()  # before the runs: the commit measured, not the one at the end
    started = time.monotonic()
    for name, server, generator in ((n, s, g) for n in names for s in servers for g in generators):
        sys.stderr.write(f"{name} / {server} / {generator} generator ... ")
        sys.stderr.flush()
        for attempt in range(1 + args.retries):
            # waiting for quiet and repeating noisy runs share one time budget
            t0 = time.monotonic()
            r = run_one(BY_NAME[name], server, logdir, args.quiet_wait if extra < args.budget else 0.0,
                        generator, tuple(args.gen_arg))
            r["attempts"] = attempt + 1
            spent = time.monotonic() - t0
            extra += spent if attempt else max(0.0, spent - r["run_s"] - 3.0)
            if r["others_cpu"] <= NOISY or extra >= args.budget or attempt == args.retries:
                break
            sys.stderr.write(f"other work used {r['others_cpu']} cores, again ... ")
        results.append(r)
        sys.stderr.write(
            f"{r.get('delivered_per_s', 0):,.0f} pins/s p99 {r.get('p99_ms')} ms"
            f" server {r.get('server_cpu_frac')} gen {r.get('gen_cpu_frac')} busy {r.get('core_busy')}"
            f" others {r['others_cpu']} converged {r.get('converged')} ({r['run_s']} s)\n"
        )
    elapsed = time.monotonic() - started
    if args.json:
        args.json.write_text(json.dumps(
            {"argv": argv, "elapsed_s": elapsed, "machine": facts, "results": results}, indent=1) + "\n")
    report = render(results, argv, elapsed, facts)
    if args.out:
        args.out.write_text(report)
    else:
        sys.stdout.write(report)
    shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
