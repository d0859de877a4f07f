#!/usr/bin/env node
// Fan-out load generator on Node.js and the `ws` client: the independent
// twin of bench/loadgen.py.
//
// Same scenarios, same quantities, same JSON keys as loadgen.py, but nothing
// shared with it: each connection is a plain `ws` WebSocket client (what a
// Node app would use), which reads every frame as soon as the socket is
// readable, masks with a random key, answers pings, validates UTF-8, and
// runs on Node's own event loop. One process, pinned by bench/run.py to the
// generator core. Traffic goes to loopback only.
//
// What it measures (see bench/README.md, "How the generators measure"):
// * delivered pin states: pins in `update` frames read in the measured window;
// * latency: from just before a move's ws.send() to the 'message' event of
//   each client that gets the pin state carrying that move's seq, over every
//   pin state of moves sent in the window (0.1 ms bins);
// * convergence after the moves stop (every 100 ms, up to --settle s);
// * server CPU: utime+stime of the server process (/proc/PID/stat), and both
//   cores' busy and softirq time (/proc/stat), read exactly as loadgen.py does;
// * server RSS (/proc/PID/status).
//
// A fan-out server sends the same bytes to many clients, so each distinct
// payload is parsed once and remembered; the same bytes again are found by a
// Map lookup on the payload's length and tail, then compared in full
// (Buffer.equals): exactly as strict as parsing it again.
//
// usage: node bench/loadgen.js --port PORT --server-pid PID --clients N --movers M [...]

'use strict';

const fs = require('fs');
const path = require('path');
const { performance } = require('perf_hooks');
const { execFileSync } = require('child_process');
// ws is pinned (with its lock file) in bench/peers/, beside the naive Node peer.
const WebSocket = require(require.resolve('ws', { paths: [path.join(__dirname, 'peers')] }));

const LATENCY_BIN_MS = 0.1;
const LATENCY_MAX_MS = 120000;
const NBINS = Math.floor(LATENCY_MAX_MS / LATENCY_BIN_MS) + 1;
const K_UPDATE = 0;
const K_SNAPSHOT = 1;
const K_ERROR = 2;
const K_OTHER = 3;
// client states
const CONNECTING = 0;
const OPEN = 1;
const READY = 2;
const STALLED = 3;
const CLOSED = 4;

// -- command line -------------------------------------------------------------

function parseArgs(argv) {
  const spec = {
    host: ['127.0.0.1', String], port: [null, Number], map: ['bench', String],
    clients: [null, Number], movers: [0, Number], rate: [1.0, Number],
    duration: [10.0, Number], warmup: [2.0, Number], settle: [1.5, Number],
    stalled: [0, Number], views: [false, Boolean], 'idle-hold': [2.0, Number],
    concurrency: [200, Number], 'server-pid': [null, Number], seed: [1, Number],
    'per-address': [100, Number], cpu: [null, Number], 'read-pace-ms': [0, Number],
  };
  const out = {};
  for (const [k, [dflt]] of Object.entries(spec)) out[k] = dflt;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const name = a.slice(2);
    if (!(name in spec)) throw new Error(`unknown option ${a}`);
    if (spec[name][1] === Boolean) {
      out[name] = true;
    } else {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      out[name] = spec[name][1] === Number ? Number(v) : v;
    }
  }
  for (const req of ['port', 'clients', 'server-pid']) {
    if (out[req] === null || Number.isNaN(out[req])) throw new Error(`--${req} is required`);
  }
  if (!['127.0.0.1', 'localhost', '::1'].includes(out.host)) throw new Error('traffic goes to loopback only');
  // --cpu and --read-pace-ms are accepted for loadgen.py's command line; run.py
  // pins this process, and ws always reads at once.
  return {
    host: out.host, port: out.port, map: out.map, clients: out.clients,
    movers: Math.min(out.movers, out.clients), rate: out.rate, duration: out.duration,
    warmup: out.warmup, settle: out.settle, stalled: out.stalled, views: out.views,
    idleHold: out['idle-hold'], concurrency: out.concurrency, serverPid: out['server-pid'],
    seed: out.seed, perAddress: out['per-address'],
  };
}

// -- /proc, read exactly as loadgen.py reads it --------------------------------

let CLK_TCK = 100;
try {
  CLK_TCK = parseInt(execFileSync('getconf', ['CLK_TCK']).toString(), 10) || 100;
} catch (e) { /* keep 100 */ }

function procCpuSeconds(pid) {
  const s = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  const f = s.slice(s.lastIndexOf(')') + 1).trim().split(/\s+/);
  return (parseInt(f[11], 10) + parseInt(f[12], 10)) / CLK_TCK;
}

function procRssKb(pid) {
  const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
  return m ? parseInt(m[1], 10) : 0;
}

// Per core [busy, softirq, total, idle] clock ticks and the time read (s).
// Busy is wall time minus idle (idle is measured exactly; user, system and
// softirq are sampled by the timer tick and miss short bursts): see
// core_ticks() in loadgen.py.
function coreTicks() {
  const out = new Map();
  const t = now() / 1000;
  for (const line of fs.readFileSync('/proc/stat', 'latin1').split('\n')) {
    const m = /^cpu(\d+)\s+(.*)$/.exec(line);
    if (!m) continue;
    const v = m[2].trim().split(/\s+/).map(Number);
    const total = v.slice(0, 8).reduce((x, y) => x + y, 0);
    out.set(Number(m[1]), [total - v[3] - v[4], v[6], total, v[3] + v[4], t]);
  }
  return out;
}

function coreBusy(a, b) {
  const res = {};
  for (const k of [...a.keys()].sort((x, y) => x - y)) {
    if (!b.has(k)) continue;
    const [A, B] = [a.get(k), b.get(k)];
    const total = Math.max(B[2] - A[2], 1);
    const wall = Math.max(B[4] - A[4], 1e-9);
    res[`core${k}`] = round(Math.min(1, Math.max(0, 1 - (B[3] - A[3]) / CLK_TCK / wall)), 3);
    res[`core${k}_softirq`] = round((B[1] - A[1]) / total, 3);
    res[`core${k}_sampled`] = round((B[0] - A[0]) / total, 3);
  }
  return res;
}

function selfCpuSeconds() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

const TCP_EXT = ['DelayedACKs', 'TCPPureAcks', 'TCPHPAcks', 'TCPHPHits', 'TCPBacklogCoalesce', 'TCPAutoCorking'];
const NCPU = require('os').cpus().length || 1;

// The same diagnostic counters as loadgen.py's kernel_counters(): IPIs, timer
// interrupts and softirqs per core, the server's user and system time and its
// context switches, ours, and TCP segments and ACKs.
function kernelCounters(pid) {
  const out = {};
  for (const line of fs.readFileSync('/proc/interrupts', 'latin1').split('\n')) {
    const parts = line.trim().split(/\s+/);
    if (['RES:', 'CAL:', 'LOC:'].includes(parts[0])) {
      for (let c = 0; c < NCPU; c++) out[`irq_${parts[0].slice(0, -1).toLowerCase()}_core${c}`] = Number(parts[1 + c]);
    }
  }
  for (const line of fs.readFileSync('/proc/softirqs', 'latin1').split('\n')) {
    const parts = line.trim().split(/\s+/);
    if (['NET_RX:', 'TIMER:'].includes(parts[0])) {
      for (let c = 0; c < NCPU; c++) out[`softirq_${parts[0].slice(0, -1).toLowerCase()}_core${c}`] = Number(parts[1 + c]);
    }
  }
  const st = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  const f = st.slice(st.lastIndexOf(')') + 1).trim().split(/\s+/);
  out.server_user_s = Number(f[11]) / CLK_TCK;
  out.server_system_s = Number(f[12]) / CLK_TCK;
  const status = fs.readFileSync(`/proc/${pid}/status`, 'latin1');
  out.server_voluntary_switches = Number(/\nvoluntary_ctxt_switches:\s+(\d+)/.exec(status)[1]);
  out.server_involuntary_switches = Number(/nonvoluntary_ctxt_switches:\s+(\d+)/.exec(status)[1]);
  const ru = process.resourceUsage();
  out.gen_voluntary_switches = ru.voluntaryContextSwitches;
  out.gen_involuntary_switches = ru.involuntaryContextSwitches;
  for (const [file, prefix, want] of [['/proc/net/snmp', 'Tcp:', ['InSegs', 'OutSegs']], ['/proc/net/netstat', 'TcpExt:', TCP_EXT]]) {
    const rows = fs.readFileSync(file, 'latin1').split('\n').filter((l) => l.startsWith(prefix)).map((l) => l.trim().split(/\s+/));
    if (rows.length >= 2) {
      rows[0].slice(1).forEach((name, j) => {
        if (want.includes(name)) out[`tcp_${name}`] = Number(rows[1][1 + j]);
      });
    }
  }
  return out;
}

function kernelRates(a, b, seconds) {
  const out = {};
  for (const k of Object.keys(a)) {
    if (k in b) out[k] = round((b[k] - a[k]) / seconds, k.endsWith('_s') ? 3 : 1);
  }
  return out;
}

function round(x, digits) {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

// mulberry32: a small seeded PRNG (the layout need not match loadgen.py's draw
// for draw, only its distribution)
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const now = () => performance.now(); // ms, monotonic
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

// -- the generator -------------------------------------------------------------

class LoadGen {
  constructor(cfg) {
    this.cfg = cfg;
    this.random = rng(cfg.seed);
    const n = cfg.clients;
    const m = Math.max(cfg.movers, 1);
    this.m = m;
    this.clients = [];
    for (let i = 0; i < n; i++) {
      this.clients.push({ i, ws: null, state: CONNECTING, pinId: '', mover: -1, stalled: false, bbox: null });
    }
    for (let k = 0; k < cfg.movers; k++) this.clients[k].mover = k;
    for (let k = 0; k < cfg.stalled; k++) this.clients[n - 1 - k].stalled = true;
    // latest seq per (client, mover); -1: no pin, -2: a pin without seq
    this.rows = new Int32Array(n * m).fill(-1);
    this.foreign = new Int32Array(n);
    this.truth = new Int32Array(m).fill(-1);
    const cap = Math.floor(cfg.movers * cfg.rate * (cfg.duration + 5)) + 16;
    this.sendTimes = new Float64Array(cap);
    this.seqMover = new Int32Array(cap).fill(-1);
    this.nextSeq = 1;
    this.id2idx = new Map();
    this.memo = new Map(); // length:tail -> [entry, ...]
    this.distinct = 0;
    this.hist = new Uint32Array(NBINS);
    this.tw0 = Infinity; // window start: moves sent from then on are timed
    this.inWindow = false;
    this.delivered = 0;
    this.disorder = 0;
    this.errors = {};
    this.closedByServer = 0;
    this.connectFailures = 0;
    this.failures = [];
    this.ready = 0;
    this.pending = 0;
    this.nextToConnect = 0;
    this.movesSent = 0;
    this.rssSamples = [];
    this.maxLoopLagMs = 0;
    this.homes = this.makeHomes();
    this.pos = this.homes.map((h) => [h[0], h[1]]);
    this.inView = null;
    if (cfg.views) this.assignViews();
    this.onAllReady = null;
  }

  makeHomes() {
    const { movers, views } = this.cfg;
    const homes = [];
    for (let k = 0; k < movers; k++) {
      if (!views) {
        homes.push([48.85 + (this.random() - 0.5) * 0.1, 2.35 + (this.random() - 0.5) * 0.1]);
      } else {
        // a world-wide grid of 5 x 9 degree cells (24 x 40), a pin at each centre
        const cell = k % 960;
        const r = Math.floor(cell / 40);
        const c = cell % 40;
        homes.push([-60 + r * 5 + 2.5, -180 + c * 9 + 4.5]);
      }
    }
    return homes;
  }

  assignViews() {
    // each client watches a 10 x 18 degree box (about four grid pins), some
    // crossing the antimeridian; movers never leave their cell
    for (const c of this.clients) {
      const south = -60 + Math.floor(this.random() * 23) * 5;
      const west = -180 + Math.floor(this.random() * 40) * 9;
      let east = west + 18;
      if (east > 180) east -= 360;
      c.bbox = [west, south, east, south + 10];
    }
  }

  computeInView() {
    const { m } = this;
    const out = new Uint8Array(this.clients.length * m);
    let total = 0;
    for (const c of this.clients) {
      const [west, south, east, north] = c.bbox;
      for (let k = 0; k < this.cfg.movers; k++) {
        const [lat, lng] = this.homes[k];
        const inLat = lat >= south && lat <= north;
        const inLng = west <= east ? lng >= west && lng <= east : lng >= west || lng <= east;
        if (inLat && inLng) {
          out[c.i * m + k] = 1;
          total++;
        }
      }
    }
    this.inView = out;
    return total / this.clients.length;
  }

  // -- connections ---------------------------------------------------------

  fillConnects() {
    const { cfg } = this;
    while (this.pending < cfg.concurrency && this.nextToConnect < this.clients.length) {
      this.connect(this.clients[this.nextToConnect++]);
    }
  }

  connect(c) {
    const { cfg } = this;
    const opts = { perMessageDeflate: false, handshakeTimeout: 30000, maxPayload: 64 * 1024 * 1024 };
    if (cfg.perAddress) {
      // real clients come from many addresses, and a server may cap
      // connections per address: spread over 127.0.0.0/8 as loadgen.py does
      const a = Math.floor(c.i / cfg.perAddress);
      opts.localAddress = `127.0.${Math.floor(a / 250)}.${(a % 250) + 2}`;
    }
    this.pending++;
    const ws = new WebSocket(`ws://${cfg.host}:${cfg.port}/ws/${cfg.map}`, opts);
    c.ws = ws;
    c.state = OPEN;
    ws.on('message', (data, isBinary) => {
      const t = now();
      if (!isBinary) this.onMessage(c, data, t);
    });
    ws.on('error', (err) => this.fail(c, `error: ${err.message}`));
    ws.on('close', (code) => {
      if (c.state === READY || c.state === STALLED) {
        this.closedByServer++;
        this.note(`server closed: ${code}`);
      }
      this.fail(c, `closed: ${code}`);
    });
  }

  note(why) {
    if (this.failures.length < 10) this.failures.push(why);
  }

  fail(c, why) {
    if (c.state === OPEN || c.state === CONNECTING) {
      this.pending--;
      this.connectFailures++;
      this.note(why);
      setImmediate(() => this.fillConnects());
      this.checkAllReady();
    }
    c.state = CLOSED;
  }

  becameReady(c) {
    c.state = c.stalled ? STALLED : READY;
    this.ready++;
    this.pending--;
    // from now on it never reads: the server sees a full receive window
    if (c.stalled) c.ws.pause();
    this.fillConnects();
    this.checkAllReady();
  }

  checkAllReady() {
    if (this.onAllReady && this.ready + this.connectFailures >= this.clients.length) {
      const f = this.onAllReady;
      this.onAllReady = null;
      f();
    }
  }

  // -- receiving -----------------------------------------------------------

  lookup(data) {
    const len = data.length;
    const key = `${len}:${data.toString('latin1', Math.max(0, len - 40), len)}`;
    const bucket = this.memo.get(key);
    if (bucket !== undefined) {
      for (let j = 0; j < bucket.length; j++) {
        if (bucket[j].buf.equals(data)) return bucket[j];
      }
    }
    return key;
  }

  onMessage(c, data, t) {
    let e = this.lookup(data);
    if (typeof e === 'string') {
      if (!c.pinId) {
        this.welcome(c, data);
        return;
      }
      const key = e;
      e = this.parse(data);
      if (e === null) return;
      const bucket = this.memo.get(key);
      if (bucket === undefined) this.memo.set(key, [e]);
      else bucket.push(e);
      this.distinct++;
    }
    const base = c.i * this.m;
    const rows = this.rows;
    if (e.kind === K_UPDATE) {
      const { idx, seqs, n } = e;
      const views = this.cfg.views;
      const inView = this.inView;
      const sendTimes = this.sendTimes;
      const tw0 = this.tw0;
      let wanted = 0;
      for (let j = 0; j < n; j++) {
        const k = idx[j];
        const s = seqs[j];
        if (rows[base + k] > s) this.disorder++;
        rows[base + k] = s;
        // only pins inside the receiver's box count in views-10k: a server
        // that ignores views delivers the rest to no purpose
        if (views && !inView[base + k]) continue;
        wanted++;
        if (s > 0 && s < sendTimes.length) {
          const sent = sendTimes[s];
          if (sent >= tw0) {
            let b = Math.floor((t - sent) / LATENCY_BIN_MS);
            if (b < 0) b = 0;
            else if (b >= NBINS) b = NBINS - 1;
            this.hist[b]++;
          }
        }
      }
      if (e.gone !== null) for (const g of e.gone) rows[base + g] = -1;
      if (e.foreign) this.foreign[c.i] += e.foreign;
      if (this.inWindow) this.delivered += wanted;
    } else if (e.kind === K_SNAPSHOT) {
      rows.fill(-1, base, base + this.m);
      for (let j = 0; j < e.n; j++) rows[base + e.idx[j]] = e.seqs[j];
      this.foreign[c.i] = e.foreign;
      if (c.state === OPEN && this.cfg.views && c.bbox !== null) this.becameReady(c);
    } else if (e.kind === K_ERROR) {
      this.errors[e.code] = (this.errors[e.code] || 0) + 1;
    }
  }

  welcome(c, data) {
    let msg;
    try {
      msg = JSON.parse(data.toString('utf8'));
    } catch (err) {
      this.fail(c, 'welcome: bad json');
      c.ws.terminate();
      return;
    }
    if (msg.type !== 'welcome') {
      this.fail(c, `first message was ${msg.type}`);
      c.ws.terminate();
      return;
    }
    c.pinId = msg.id;
    if (c.mover >= 0) this.id2idx.set(c.pinId, c.mover);
    const base = c.i * this.m;
    this.rows.fill(-1, base, base + this.m);
    for (const p of msg.pins || []) {
      const k = this.id2idx.get(p.id);
      if (k === undefined) this.foreign[c.i]++;
      else this.rows[base + k] = p.seq === null || p.seq === undefined ? -2 : p.seq;
    }
    if (this.cfg.views && c.bbox !== null) {
      c.ws.send(JSON.stringify({ type: 'view', bbox: c.bbox }));
      // ready once the snapshot for the box arrives (a stalled one never reads it)
      if (c.stalled) this.becameReady(c);
      return;
    }
    this.becameReady(c);
  }

  parse(data) {
    let msg;
    try {
      msg = JSON.parse(data.toString('utf8'));
    } catch (err) {
      const k = '(generator) bad json from server';
      this.errors[k] = (this.errors[k] || 0) + 1;
      return null;
    }
    const e = { buf: Buffer.from(data), kind: K_OTHER, n: 0, idx: null, seqs: null, gone: null, foreign: 0, code: '' };
    if (msg.type === 'update' || msg.type === 'snapshot') {
      e.kind = msg.type === 'update' ? K_UPDATE : K_SNAPSHOT;
      const idx = [];
      const seqs = [];
      for (const p of msg.pins) {
        const k = this.id2idx.get(p.id);
        if (k === undefined) {
          e.foreign++;
          continue;
        }
        idx.push(k);
        seqs.push(p.seq === null || p.seq === undefined ? -2 : p.seq);
      }
      e.n = idx.length;
      e.idx = Int32Array.from(idx);
      e.seqs = Int32Array.from(seqs);
      const gone = (msg.gone || []).filter((g) => this.id2idx.has(g)).map((g) => this.id2idx.get(g));
      if (gone.length) e.gone = Int32Array.from(gone);
    } else if (msg.type === 'error') {
      e.kind = K_ERROR;
      e.code = String(msg.code);
    }
    return e;
  }

  // -- moving ----------------------------------------------------------------

  move(k) {
    const c = this.clients[k];
    if (c.state !== READY) return;
    const seq = this.nextSeq++;
    const pos = this.pos[k];
    const home = this.homes[k];
    const r = this.random;
    pos[0] = Math.min(Math.max(pos[0] + (r() - 0.5) * 0.0004, home[0] - 0.01), home[0] + 0.01);
    pos[1] = Math.min(Math.max(pos[1] + (r() - 0.5) * 0.0004, home[1] - 0.01), home[1] + 0.01);
    const payload = JSON.stringify({
      type: 'move',
      lat: Math.round(pos[0] * 1e6) / 1e6,
      lng: Math.round(pos[1] * 1e6) / 1e6,
      heading: Math.floor(r() * 360),
      accuracy: 5.0,
      seq,
    });
    if (seq >= this.sendTimes.length) {
      const st = new Float64Array(this.sendTimes.length * 2);
      st.set(this.sendTimes);
      this.sendTimes = st;
      const sm = new Int32Array(this.seqMover.length * 2).fill(-1);
      sm.set(this.seqMover);
      this.seqMover = sm;
    }
    this.truth[k] = seq;
    this.seqMover[seq] = k;
    this.sendTimes[seq] = now();
    c.ws.send(payload);
  }

  // Moves at `rate` per mover, evenly spaced, round robin (as loadgen.py):
  // each timer sends every move that is due, then sleeps until the next one.
  moveUntil(tMove0, until) {
    const { cfg } = this;
    const interval = 1000 / (cfg.movers * cfg.rate);
    return new Promise((resolve) => {
      let last = now();
      const step = () => {
        const t = now();
        const lag = t - last;
        if (lag > this.maxLoopLagMs) this.maxLoopLagMs = lag;
        if (t >= until) {
          resolve();
          return;
        }
        const due = Math.floor((t - tMove0) / interval) + 1;
        let budget = cfg.movers;
        while (this.movesSent < due && budget > 0) {
          this.move(this.movesSent % cfg.movers);
          this.movesSent++;
          budget--;
        }
        const next = Math.min(tMove0 + this.movesSent * interval, until);
        last = now();
        setTimeout(step, Math.max(0, next - last));
      };
      step();
    });
  }

  // -- checks ------------------------------------------------------------------

  wrongClients() {
    const { m } = this;
    const { movers, views } = this.cfg;
    let wrong = 0;
    for (const c of this.clients) {
      if (c.state !== READY) {
        if (!c.stalled) wrong++;
        continue;
      }
      if (this.foreign[c.i] > 0) {
        wrong++;
        continue;
      }
      const base = c.i * m;
      for (let k = 0; k < movers; k++) {
        const expected = views && !this.inView[base + k] ? -1 : this.truth[k];
        if (this.rows[base + k] !== expected) {
          wrong++;
          break;
        }
      }
    }
    return wrong;
  }

  expectedSamples(tw0, tw1) {
    const { m } = this;
    const receivers = new Float64Array(m);
    for (const c of this.clients) {
      if (c.state !== READY) continue;
      for (let k = 0; k < m; k++) {
        if (!this.cfg.views || this.inView[c.i * m + k]) receivers[k]++;
      }
    }
    let total = 0;
    for (let s = 1; s < this.nextSeq; s++) {
      const t = this.sendTimes[s];
      const k = this.seqMover[s];
      if (k >= 0 && t >= tw0 && t < tw1) total += receivers[k];
    }
    return total;
  }

  percentiles() {
    let total = 0;
    let maxBin = -1;
    for (let b = 0; b < NBINS; b++) {
      if (this.hist[b]) {
        total += this.hist[b];
        maxBin = b;
      }
    }
    if (!total) return { latency_samples: 0, p50_ms: null, p99_ms: null, max_ms: null };
    const q = (p) => {
      // the first bin whose cumulative count reaches p of the total
      const target = p * total;
      let cum = 0;
      for (let b = 0; b < NBINS; b++) {
        cum += this.hist[b];
        if (cum >= target) return round(b * LATENCY_BIN_MS, 1);
      }
      return round(maxBin * LATENCY_BIN_MS, 1);
    };
    return { latency_samples: total, p50_ms: q(0.5), p99_ms: q(0.99), max_ms: round(maxBin * LATENCY_BIN_MS, 1) };
  }

  sampleRss() {
    try {
      this.rssSamples.push(procRssKb(this.cfg.serverPid));
    } catch (e) { /* the server is gone: the result says so */ }
  }

  // -- the run -------------------------------------------------------------------

  async run() {
    const { cfg } = this;
    const pid = cfg.serverPid;
    const result = {
      generator: 'node', clients: cfg.clients, movers: cfg.movers, rate: cfg.rate,
      stalled: cfg.stalled, views: cfg.views,
    };
    const rss0 = procRssKb(pid);
    result.rss_before_kb = rss0;
    const rssTimer = setInterval(() => this.sampleRss(), 250);
    const t0 = now();
    const allReady = new Promise((resolve) => { this.onAllReady = resolve; });
    this.fillConnects();
    const deadline = 60000 + (cfg.clients / 200) * 1000;
    await Promise.race([allReady, sleep(deadline)]);
    this.onAllReady = null;
    result.connect_s = round((now() - t0) / 1000, 3);
    result.connected = this.ready;
    result.connect_failures = this.connectFailures;
    if (cfg.views) result.pins_per_view_mean = round(this.computeInView(), 2);
    await sleep((cfg.movers ? 0.5 : cfg.idleHold) * 1000);
    const rss1 = procRssKb(pid);
    result.rss_connected_kb = rss1;
    result.rss_per_conn_kb = round((rss1 - rss0) / Math.max(this.ready, 1), 2);
    this.movesSent = 0;
    if (cfg.movers) {
      const tMove0 = now();
      const w0 = tMove0 + cfg.warmup * 1000;
      const w1 = tMove0 + cfg.duration * 1000;
      this.tw0 = w0; // moves sent from here on are timed
      await this.moveUntil(tMove0, w0);
      result.rss_window_start_kb = procRssKb(pid);
      const kc0 = kernelCounters(pid);
      const cpuS0 = procCpuSeconds(pid);
      const cpuG0 = selfCpuSeconds();
      const tw0 = now();
      const k0 = coreTicks();
      this.tw0 = tw0;
      this.inWindow = true;
      await this.moveUntil(tMove0, w1);
      this.inWindow = false;
      const cpuS1 = procCpuSeconds(pid);
      const cpuG1 = selfCpuSeconds();
      const tw1 = now();
      const k1 = coreTicks();
      const kc1 = kernelCounters(pid);
      const rss2 = procRssKb(pid);
      const scheduled = Math.floor(((tw1 - tMove0) / 1000) * cfg.movers * cfg.rate);
      // settle: check convergence every 100 ms, up to `settle` seconds
      const tStop = now();
      let convergeAt = null;
      while (now() - tStop < cfg.settle * 1000) {
        await sleep(100);
        if (this.wrongClients() === 0) {
          convergeAt = (now() - tStop) / 1000;
          break;
        }
      }
      const wrong = this.wrongClients();
      const window = (tw1 - tw0) / 1000;
      const delivered = this.delivered;
      Object.assign(result, {
        moves_sent: this.movesSent,
        moves_scheduled: scheduled,
        window_s: round(window, 3),
        delivered,
        delivered_per_s: round(delivered / window, 1),
        ...this.percentiles(),
        expected_samples: this.expectedSamples(tw0, tw1),
        server_cpu_s: round(cpuS1 - cpuS0, 3),
        server_cpu_frac: round((cpuS1 - cpuS0) / window, 3),
        server_cpu_us_per_pin: delivered ? round(((cpuS1 - cpuS0) / delivered) * 1e6, 3) : null,
        gen_cpu_frac: round((cpuG1 - cpuG0) / window, 3),
        core_busy: coreBusy(k0, k1),
        rss_end_kb: rss2,
        rss_per_conn_end_kb: round((rss2 - rss0) / Math.max(this.ready, 1), 2),
        converged: wrong === 0,
        wrong_clients: wrong,
        converge_s: convergeAt === null ? null : round(convergeAt, 3),
        disorder: this.disorder,
        distinct_payloads: this.distinct,
        kernel_per_s: kernelRates(kc0, kc1, window),
      });
    } else {
      const cpuS0 = procCpuSeconds(pid);
      const cpuG0 = selfCpuSeconds();
      const tw0 = now();
      const k0 = coreTicks();
      await sleep(1000);
      const window = (now() - tw0) / 1000;
      const wrong = this.wrongClients();
      Object.assign(result, {
        core_busy: coreBusy(k0, coreTicks()),
        server_cpu_frac: round((procCpuSeconds(pid) - cpuS0) / window, 3),
        gen_cpu_frac: round((selfCpuSeconds() - cpuG0) / window, 3),
        converged: wrong === 0,
        wrong_clients: wrong,
      });
    }
    clearInterval(rssTimer);
    // the longest a move timer fired late: the event loop was busy that long
    result.gen_max_batch_ms = round(this.maxLoopLagMs, 1);
    let peak = 0;
    try { peak = procRssKb(pid); } catch (e) { /* gone */ }
    result.rss_peak_kb = Math.max(peak, ...this.rssSamples);
    result.errors = this.errors;
    result.closed_by_server = this.closedByServer;
    result.failures = this.failures;
    return result;
  }

  close() {
    // reset every connection (SO_LINGER 0): no TIME_WAIT pile-up between runs
    for (const c of this.clients) {
      const sock = c.ws && c.ws._socket;
      c.state = CLOSED;
      if (sock && !sock.destroyed) {
        try {
          sock.resetAndDestroy();
        } catch (e) {
          sock.destroy();
        }
      } else if (c.ws) {
        c.ws.terminate();
      }
    }
  }
}

async function main() {
  let cfg;
  try {
    cfg = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`loadgen.js: ${e.message}\n`);
    process.exit(2);
  }
  const gen = new LoadGen(cfg);
  // a hard stop: never outlive the run by much, whatever happens
  const limit = (cfg.duration + cfg.settle + cfg.idleHold + 120 + cfg.clients / 100) * 1000;
  setTimeout(() => {
    process.stderr.write('loadgen.js: time limit reached\n');
    gen.close();
    process.exit(3);
  }, limit).unref();
  let result;
  try {
    result = await gen.run();
  } finally {
    gen.close();
  }
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
}

main().catch((e) => {
  process.stderr.write(`loadgen.js: ${e.stack || e}\n`);
  process.exit(1);
});
