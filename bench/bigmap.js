#!/usr/bin/env node
// The big-map scenario (issue 20) on Node.js and the `ws` client: the
// independent twin of the generator part of bench/bigmap.py.
//
// Same scenario, same arguments, same JSON keys, no code shared with it:
// one map, N people moving at 1 Hz (each watching its own street, zoom 17),
// N viewers whose clustered view is in the WebSocket URL
// (`/ws/{map}?bbox=W,S,E,N&zoom=Z`): 40 % street (zoom 16), 40 %
// neighbourhood (zoom 14), 15 % city (zoom 11), 5 % zoomed out (zoom 6).
// Every connection is a plain `ws` client, which parses every frame it gets
// (a `ws` client cannot skip frames), so this generator does more per
// connection than bigmap.py, which reads unsampled sockets without framing.
//
// What it measures:
// * bytes: each connection's TCP bytes read in the window (the socket's
//   bytesRead at both ends of it), per class median and max;
// * for --sample viewers of each class and --sample people: the picture
//   rebuilt from welcome/snapshot/update (pins, clusters, total, gone), the
//   latency of every pin state that reaches a picture already showing that
//   pin (from just before the move's send to the 'message' event), and once
//   the moves stop, each picture against the truth: the positions sent, cut
//   into the view's Web Mercator cells of level min(zoom+1, 23) as
//   docs/protocol.md says (tile formula written from the spec);
// * generator CPU (process.cpuUsage) and event-loop lag, so that a
//   saturated generator is visible; server CPU and both cores' busy time
//   from /proc.
//
// bench/bigmap.py --generator node starts the server, pins this process to
// the generator core and adds background_before and server_survived.
//
// usage: node bench/bigmap.js --port PORT --server-pid PID --people N --viewers N [...]

'use strict';

const fs = require('fs');
const path = require('path');
const { performance } = require('perf_hooks');
const { execFileSync } = require('child_process');
// ws is pinned (with its lock file) in bench/peers/.
const WebSocket = require(require.resolve('ws', { paths: [path.join(__dirname, 'peers')] }));

const CENTRE = { lat: 48.85, lng: 2.35 };
const SPREAD = { lat: 0.09, lng: 0.135 }; // half the people over 20 km
const PLACES = 20; // the other half around 20 busy places
const PLACE_SIGMA = { lat: 0.003, lng: 0.0045 };
// name, share, zoom, half height and width of the box (degrees)
const VIEWER_KINDS = [
  ['street', 0.40, 16, 0.00225, 0.0034],
  ['neighbourhood', 0.40, 14, 0.0135, 0.0205],
  ['city', 0.15, 11, 0.09, 0.135],
  ['zoomed-out', 0.05, 6, 2.0, 3.0],
];
// what a moving person's own page shows: its street, or a pocket's few metres
const PERSON_VIEWS = { street: [17, 0.0007, 0.001], pocket: [17, 0.00001, 0.00001] };
const K = 4; // a cell of more than K pins is one cluster (protocol.md)
const NO_CLUSTER_ZOOM = 18;
const MERCATOR_LAT = 85.0511287798066;

// -- command line -------------------------------------------------------------

function parseArgs(argv) {
  const spec = {
    people: 1000, viewers: 1000, rate: 1.0, 'people-view': 'street', duration: 10.0, warmup: 3.0,
    settle: 4.0, sample: 50, concurrency: 200, seed: 20, map: 'bigmap', port: null,
    'server-pid': null,
  };
  const o = { ...spec };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    if (!argv[i].startsWith('--') || !(name in spec)) {
      throw new Error(`unknown argument ${argv[i]}`);
    }
    if (argv[i + 1] === undefined) throw new Error(`${argv[i]} needs a value`);
    o[name] = typeof spec[name] === 'string' ? argv[i + 1] : Number(argv[i + 1]);
  }
  if (!o.port || !o['server-pid']) throw new Error('--port and --server-pid are required');
  if (!(o['people-view'] in PERSON_VIEWS)) throw new Error('--people-view: street or pocket');
  return o;
}

// -- /proc ------------------------------------------------------------------------

let TCK = 100;
try {
  TCK = Number(execFileSync('getconf', ['CLK_TCK']).toString()) || 100;
} catch (e) { /* 100 */ }

function cpuOf(pid) {
  const text = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / TCK; // utime + stime
}

function ownCpu() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

// per core: [idle ticks, softirq ticks, all ticks, sampled busy ticks], read at `at` (s)
function coreStat() {
  const cores = {};
  for (const line of fs.readFileSync('/proc/stat', 'latin1').split('\n')) {
    const m = /^cpu(\d+) +(.*)/.exec(line);
    if (!m) continue;
    const v = m[2].split(/ +/).map(Number);
    const all = v.slice(0, 8).reduce((a, b) => a + b, 0);
    cores[m[1]] = [v[3] + v[4], v[6], all, all - v[3] - v[4]];
  }
  return { at: now() / 1000, cores };
}

// Busy share of each core over the window: wall time minus idle (idle is
// accounted exactly, the rest only sampled by the tick), plus the sampled
// shares, under the keys bigmap.py uses.
function coresBusy(a, b) {
  const out = {};
  const wall = Math.max(b.at - a.at, 1e-9);
  for (const k of Object.keys(a.cores).sort((x, y) => x - y)) {
    if (!b.cores[k]) continue;
    const d = b.cores[k].map((x, j) => x - a.cores[k][j]);
    const ticks = Math.max(d[2], 1);
    out[`core${k}`] = fix(Math.min(1, Math.max(0, 1 - d[0] / TCK / wall)), 3);
    out[`core${k}_softirq`] = fix(d[1] / ticks, 3);
    out[`core${k}_sampled`] = fix(d[3] / ticks, 3);
  }
  return out;
}

// -- small helpers -------------------------------------------------------------

const now = () => performance.now(); // ms
const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));
const fix = (x, d) => Math.round(x * 10 ** d) / 10 ** d;
const r6 = (x) => Math.round(x * 1e6) / 1e6;

// xoshiro128** seeded by splitmix32: the layout follows bigmap.py's
// distribution, not its draws
function prng(seed) {
  let z = seed >>> 0;
  const split = () => {
    z = (z + 0x9e3779b9) >>> 0;
    let t = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
    t = Math.imul(t ^ (t >>> 15), 0x735a2d97);
    return (t ^ (t >>> 15)) >>> 0;
  };
  const s = [split(), split(), split(), split()];
  const next = () => {
    const r = Math.imul(((Math.imul(s[1], 5) << 7) | (Math.imul(s[1], 5) >>> 25)), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t;
    s[3] = (s[3] << 11) | (s[3] >>> 21);
    return r / 4294967296;
  };
  next.between = (lo, hi) => lo + (hi - lo) * next();
  // Box-Muller
  next.normal = (mu, sigma) => mu
    + sigma * Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next());
  return next;
}

// The Web Mercator tile (column, row) of a point at `level`, from the
// textbook formula: row = (1 - ln(tan(lat) + sec(lat)) / pi) / 2 * 2^level.
// Rows beyond 85.05 degrees belong to the first or last row (protocol.md).
function tile(lat, lng, level) {
  const n = 2 ** level;
  const phi = Math.max(-MERCATOR_LAT, Math.min(MERCATOR_LAT, lat)) * Math.PI / 180;
  const fx = (lng + 180) / 360 * n;
  const fy = (1 - Math.log(Math.tan(phi) + 1 / Math.cos(phi)) / Math.PI) / 2 * n;
  const clamp = (v) => Math.min(n - 1, Math.max(0, Math.floor(v)));
  return [clamp(fx), clamp(fy), fx, fy];
}

const median = (v) => (v.length % 2 ? v[(v.length - 1) / 2]
  : (v[v.length / 2 - 1] + v[v.length / 2]) / 2);

// -- the generator -------------------------------------------------------------

class BigMapNode {
  constructor(o) {
    this.o = o;
    this.rand = prng(o.seed);
    this.conns = [];
    this.ready = 0;
    this.pending = 0;
    this.nextConnect = 0;
    this.failures = [];
    this.closedByServer = 0;
    this.errors = {};
    this.decoded = 0;
    this.measuring = false;
    this.latencies = [];
    this.kinds = new Map(); // "class type" -> [count, bytes]
    this.sentAt = new Float64Array(1024);
    this.seq = 0;
    this.moves = 0;
    this.maxLagMs = 0;
    const places = [];
    for (let h = 0; h < PLACES; h++) {
      places.push([CENTRE.lat + this.rand.between(-0.07, 0.07),
        CENTRE.lng + this.rand.between(-0.1, 0.1)]);
    }
    this.pos = [];
    for (let k = 0; k < o.people; k++) {
      if (k % 2 === 1) {
        const [la, ln] = places[k % PLACES];
        this.pos.push([this.rand.normal(la, PLACE_SIGMA.lat),
          this.rand.normal(ln, PLACE_SIGMA.lng)]);
      } else {
        this.pos.push([CENTRE.lat + this.rand.between(-SPREAD.lat, SPREAD.lat),
          CENTRE.lng + this.rand.between(-SPREAD.lng, SPREAD.lng)]);
      }
      this.pos[k] = this.pos[k].map(r6);
    }
    this.moved = new Uint8Array(o.people);
    const [pz, pdlat, pdlng] = PERSON_VIEWS[o['people-view']];
    for (let k = 0; k < o.people; k++) {
      const [la, ln] = this.pos[k];
      this.add('person', pz, [ln - pdlng, la - pdlat, ln + pdlng, la + pdlat], k < o.sample, k);
    }
    const seen = {};
    for (let j = 0; j < o.viewers; j++) {
      let u = this.rand();
      let kind = VIEWER_KINDS[VIEWER_KINDS.length - 1];
      for (const vk of VIEWER_KINDS) {
        if (u < vk[1]) { kind = vk; break; }
        u -= vk[1];
      }
      const [name, , zoom, dlat, dlng] = kind;
      // views look where people are; zoomed-out ones at the whole city
      let [la, ln] = [CENTRE.lat, CENTRE.lng];
      if (o.people) [la, ln] = this.pos[Math.floor(this.rand() * o.people)];
      if (name === 'zoomed-out') [la, ln] = [CENTRE.lat, CENTRE.lng];
      seen[name] = (seen[name] || 0) + 1;
      const box = [ln - dlng, la - dlat, ln + dlng, la + dlat];
      this.add(name, zoom, box, seen[name] <= o.sample, -1);
    }
  }

  add(cls, zoom, box, sampled, person) {
    this.conns.push({
      i: this.conns.length, cls, zoom, bbox: box.map(r6), sampled, person, ws: null, open: false,
      pinId: '', pins: new Map(), clusters: new Map(), total: -1, b0: 0, b1: 0,
    });
  }

  // -- connections -----------------------------------------------------------

  fill() {
    while (this.pending < this.o.concurrency && this.nextConnect < this.conns.length) {
      this.connect(this.conns[this.nextConnect++]);
    }
  }

  connect(c) {
    const { o } = this;
    const a = Math.floor(c.i / 100); // 100 connections per source address, as real clients spread
    const url = `ws://127.0.0.1:${o.port}/ws/${o.map}?bbox=${c.bbox.join(',')}&zoom=${c.zoom}`;
    const ws = new WebSocket(url, {
      perMessageDeflate: false, handshakeTimeout: 60000, maxPayload: 64 << 20,
      localAddress: `127.0.${Math.floor(a / 250)}.${(a % 250) + 2}`,
      skipUTF8Validation: !c.sampled, // JSON.parse checks the sampled ones' text anyway
    });
    c.ws = ws;
    this.pending++;
    let settled = false;
    const done = (ok, why) => {
      if (settled) return;
      settled = true;
      this.pending--;
      if (ok) this.ready++;
      else this.note(why);
      setImmediate(() => this.fill());
    };
    ws.on('open', () => {
      c.open = true;
      c.sock = ws._socket; // for bytesRead
      done(true);
    });
    if (c.sampled) ws.on('message', (data) => this.receive(c, data, now()));
    else ws.on('message', (data) => this.first(c, data, ws));
    ws.on('error', (e) => done(false, `error: ${e.message}`));
    ws.on('close', (code, reason) => {
      if (c.open) {
        this.closedByServer++;
        this.note(`closed ${code} ${reason}`);
      }
      c.open = false;
      done(false, `closed ${code} before open`);
    });
  }

  note(why) {
    if (this.failures.length < 20) this.failures.push(why);
  }

  // An unsampled connection reads its welcome (a person's pin id), then only counts bytes.
  first(c, data, ws) {
    ws.removeAllListeners('message');
    this.decoded++;
    const msg = JSON.parse(data.toString());
    if (msg.type === 'welcome') c.pinId = msg.id;
    else this.note(`first message: ${msg.type}`);
  }

  // -- a sampled picture ---------------------------------------------------------

  receive(c, data, t) {
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch (e) {
      this.errors['(generator) bad json'] = (this.errors['(generator) bad json'] || 0) + 1;
      return;
    }
    this.decoded++;
    if (this.measuring) {
      const key = `${c.cls} ${msg.type}`;
      const k = this.kinds.get(key) || [0, 0];
      k[0]++;
      k[1] += data.length;
      this.kinds.set(key, k);
    }
    switch (msg.type) {
      case 'welcome':
      case 'snapshot':
        if (msg.type === 'welcome') c.pinId = msg.id;
        c.pins = new Map(msg.pins.map((p) => [p.id, p]));
        c.clusters = new Map((msg.clusters || []).map((k) => [k.id, k]));
        c.total = msg.total === undefined ? -1 : msg.total;
        break;
      case 'update':
        for (const id of msg.gone) {
          c.pins.delete(id);
          c.clusters.delete(id);
        }
        for (const p of msg.pins) {
          // a move reaching a picture that shows the pin (not one entering it)
          const timed = Number.isInteger(p.seq) && p.seq > 0 && p.seq <= this.seq;
          if (this.measuring && timed && c.pins.has(p.id)) {
            this.latencies.push(t - this.sentAt[p.seq]);
          }
          c.pins.set(p.id, p);
        }
        for (const k of msg.clusters || []) c.clusters.set(k.id, k);
        if (msg.total !== undefined) c.total = msg.total;
        break;
      case 'error':
        this.errors[msg.code] = (this.errors[msg.code] || 0) + 1;
        break;
      default:
        this.note(`unknown message ${msg.type}`);
    }
  }

  // -- moving ----------------------------------------------------------------------

  move(k) {
    const c = this.conns[k];
    if (!c.open) return;
    const p = this.pos[k];
    p[0] = r6(p[0] + this.rand.between(-0.0002, 0.0002));
    p[1] = r6(p[1] + this.rand.between(-0.0003, 0.0003));
    const seq = ++this.seq;
    if (seq >= this.sentAt.length) {
      const grown = new Float64Array(this.sentAt.length * 2);
      grown.set(this.sentAt);
      this.sentAt = grown;
    }
    this.moved[k] = 1;
    this.sentAt[seq] = now();
    c.ws.send(JSON.stringify({ type: 'move', lat: p[0], lng: p[1], accuracy: 5.0, seq }));
  }

  // Moves at people x rate a second, evenly spaced, round robin: each timer
  // sends what is due (at most one round), then sleeps until the next one.
  moveUntil(t0, until) {
    const { people, rate } = this.o;
    const every = 1000 / (people * rate);
    return new Promise((resolve) => {
      let expected = now();
      const step = () => {
        const t = now();
        this.maxLagMs = Math.max(this.maxLagMs, t - expected);
        if (t >= until) return resolve();
        const due = Math.floor((t - t0) / every) + 1;
        for (let budget = people; this.moves < due && budget > 0; budget--) {
          this.move(this.moves % people);
          this.moves++;
        }
        expected = Math.max(Math.min(t0 + this.moves * every, until), now());
        setTimeout(step, expected - now());
      };
      step();
    });
  }

  // -- the truth ---------------------------------------------------------------------

  // Cells of `level` -> {ids, lat, lng sums}; people with a pin: those that moved
  // on a connection still open.
  cellsAt(level, memo) {
    if (memo.has(level)) return memo.get(level);
    const cells = new Map();
    for (let k = 0; k < this.o.people; k++) {
      const c = this.conns[k];
      if (!this.moved[k] || !c.open || !c.pinId) continue;
      const [x, y] = tile(this.pos[k][0], this.pos[k][1], level);
      const key = `${x}/${y}`;
      let cell = cells.get(key);
      if (!cell) cells.set(key, cell = { ids: [], lat: 0, lng: 0 });
      cell.ids.push(k);
      cell.lat += this.pos[k][0];
      cell.lng += this.pos[k][1];
    }
    memo.set(level, cells);
    return cells;
  }

  // Whether a sampled picture is the truth: the view's box widened to the
  // cells it touches; a cell of more than K pins is one cluster of that
  // count, others are their pins at the positions last sent; `total` is
  // every pin of the map. Also notes how far a cluster's centre is from its
  // pins' mean, in cells (the server resends it past 1/8 of a cell).
  isRight(c, memo, byPin, people) {
    const level = Math.min(c.zoom + 1, 23);
    const cells = this.cellsAt(level, memo);
    const [w, s, e, n] = c.bbox;
    const [x0, y0] = tile(n, w, level);
    const [x1, y1] = tile(s, e, level);
    let right = c.total === people;
    let pins = 0;
    let clusters = 0;
    for (let x = x0; x <= x1; x++) {
      for (let y = y0; y <= y1; y++) {
        const cell = cells.get(`${x}/${y}`);
        if (!cell) continue;
        if (c.zoom < NO_CLUSTER_ZOOM && cell.ids.length > K) {
          clusters++;
          const got = c.clusters.get(`c:${level}/${x}/${y}`);
          if (!got || got.count !== cell.ids.length) {
            right = false;
            continue;
          }
          const [, , fx, fy] = tile(cell.lat / cell.ids.length, cell.lng / cell.ids.length, level);
          const [, , gx, gy] = tile(got.lat, got.lng, level);
          this.centreOff = Math.max(this.centreOff, Math.abs(fx - gx), Math.abs(fy - gy));
        } else {
          for (const k of cell.ids) {
            pins++;
            const got = c.pins.get(this.conns[k].pinId);
            if (!got || got.lat !== this.pos[k][0] || got.lng !== this.pos[k][1]) right = false;
          }
        }
      }
    }
    // nothing more than that: no other pins, no other clusters
    if (c.pins.size !== pins || c.clusters.size !== clusters) right = false;
    for (const id of c.pins.keys()) if (!byPin.has(id)) right = false;
    return right;
  }

  wrong() {
    const memo = new Map();
    const byPin = new Set();
    let people = 0;
    for (let k = 0; k < this.o.people; k++) {
      const c = this.conns[k];
      if (this.moved[k] && c.open && c.pinId) {
        byPin.add(c.pinId);
        people++;
      }
    }
    this.centreOff = 0;
    const bad = (c) => c.sampled && c.open && !this.isRight(c, memo, byPin, people);
    return this.conns.filter(bad).length;
  }

  // -- the run -----------------------------------------------------------------------

  async run() {
    const { o } = this;
    const t = now();
    this.fill();
    const deadline = t + (120 + this.conns.length / 100) * 1000;
    while (this.nextConnect < this.conns.length || this.pending > 0) {
      if (now() > deadline) break;
      await sleep(50);
    }
    const result = {
      generator: 'node', people: o.people, viewers: o.viewers, people_view: o['people-view'],
      connected: this.ready, connect_s: fix((now() - t) / 1000, 1),
    };
    await sleep(1000);
    const t0 = now();
    await this.moveUntil(t0, t0 + o.warmup * 1000);
    const bytesAt = () => this.conns.map((c) => (c.sock ? c.sock.bytesRead : 0));
    this.measuring = true;
    const cpu0 = cpuOf(o['server-pid']);
    const gen0 = ownCpu();
    const k0 = coreStat();
    const w0 = now();
    const b0 = bytesAt();
    this.maxLagMs = 0;
    await this.moveUntil(t0, t0 + o.duration * 1000);
    const b1 = bytesAt();
    const w1 = now();
    const cpu1 = cpuOf(o['server-pid']);
    const gen1 = ownCpu();
    const k1 = coreStat();
    this.measuring = false;
    const lag = this.maxLagMs;
    const scheduled = Math.floor((w1 - t0) / 1000 * o.people * o.rate);
    const window = (w1 - w0) / 1000;
    // quiet: pins go at the next tick, cells at the next cluster pass
    const tStop = now();
    let converged = null;
    while (now() - tStop < o.settle * 1000) {
      await sleep(250);
      if (this.wrong() === 0) {
        converged = fix((now() - tStop) / 1000, 2);
        break;
      }
    }
    const wrong = this.wrong();
    const perClass = {};
    for (const name of ['person', ...VIEWER_KINDS.map((v) => v[0])]) {
      const of = this.conns.filter((c) => c.cls === name);
      if (!of.length) continue;
      const rates = of.map((c) => (b1[c.i] - b0[c.i]) / window).sort((x, y) => x - y);
      perClass[name] = {
        count: rates.length, median_B_s: Math.round(median(rates)),
        max_B_s: Math.round(rates[rates.length - 1]),
        sampled: of.filter((c) => c.sampled).length,
      };
    }
    const lat = Float64Array.from(this.latencies).sort();
    const q = (p) => (lat.length
      ? fix(lat[Math.min(lat.length - 1, Math.floor(p * lat.length))], 1) : null);
    const kinds = {};
    for (const key of [...this.kinds.keys()].sort()) kinds[key] = this.kinds.get(key);
    Object.assign(result, {
      window_s: fix(window, 2), moves_per_s: fix(o.people * o.rate, 1),
      server_cpu_frac: fix((cpu1 - cpu0) / window, 3),
      gen_cpu_frac: fix((gen1 - gen0) / window, 3),
      core_busy: coresBusy(k0, k1), latency_samples: lat.length,
      p50_ms: q(0.5), p99_ms: q(0.99), max_ms: q(1),
      bytes_per_s: perClass, sampled: this.conns.filter((c) => c.sampled).length,
      wrong_sampled: wrong, converged_after_s: converged, closed_by_server: this.closedByServer,
      errors: this.errors, failures: this.failures.slice(0, 10), moves_sent: this.moves,
      decoded: this.decoded,
      sampled_messages: kinds,
      // Node's own: moves due by the window's end, the longest the move timer
      // fired late in the window (a busy event loop), cluster centres' offset
      moves_scheduled: scheduled, gen_max_lag_ms: fix(lag, 1),
      cluster_centre_max_off_cells: fix(this.centreOff, 3),
    });
    return result;
  }

  close() {
    for (const c of this.conns) {
      if (!c.ws) continue;
      const sock = c.ws._socket;
      if (sock && !sock.destroyed) sock.resetAndDestroy(); // no TIME_WAIT pile-up between runs
      else c.ws.terminate();
    }
  }
}

async function main() {
  let o;
  try {
    o = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`bigmap.js: ${e.message}\n`);
    process.exit(2);
  }
  const gen = new BigMapNode(o);
  // never outlive the run by much, whatever happens
  const limit = (o.duration + o.settle + 130 + (o.people + o.viewers) / 100) * 1000;
  setTimeout(() => {
    process.stderr.write('bigmap.js: time limit reached\n');
    gen.close();
    process.exit(3);
  }, limit).unref();
  let result;
  try {
    result = await gen.run();
  } finally {
    gen.close();
  }
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`, () => process.exit(0));
}

main().catch((e) => {
  process.stderr.write(`bigmap.js: ${e.stack || e}\n`);
  process.exit(1);
});
