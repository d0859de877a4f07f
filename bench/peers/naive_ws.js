#!/usr/bin/env node
// Naive Node.js broadcast peer for the livemap fan-out benchmark.
//
// It speaks livemap's wire protocol (docs/protocol.md) the simplest way a
// Node developer would: every accepted move is encoded once and handed to
// ws.send() for every client of the map, one message per move per client,
// with no coalescing, no per-client buffer bound and no views (a `view` is
// answered with a snapshot of every pin, unfiltered). It exists so
// bench/run.py can show what livemap's tick-based fan-out buys over a plain
// broadcast on the fastest common runtime. Not a reference implementation:
// validation is only what keeps the benchmark honest.
//
// usage: node naive_ws.js --port PORT [--host 127.0.0.1]

'use strict';

const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const PORT = parseInt(arg('--port', '8080'), 10);
const HOST = arg('--host', '127.0.0.1');
const MAP_PATH = /^\/ws\/([A-Za-z0-9_-]{1,64})$/;
const MAX_MESSAGE = 4096;

// map name -> { clients: Set<ws>, pins: Map<id, pin> }
const maps = new Map();

function mapNamed(name) {
  let m = maps.get(name);
  if (m === undefined) {
    m = { clients: new Set(), pins: new Map() };
    maps.set(name, m);
  }
  return m;
}

function broadcast(m, payload) {
  // The naive part: one framed message per client per change.
  for (const client of m.clients) {
    if (client.readyState === 1) client.send(payload);
  }
}

function sendError(ws, code, message) {
  ws.send(JSON.stringify({ type: 'error', code, message }));
}

function finite(x) {
  return typeof x === 'number' && Number.isFinite(x);
}

function onMove(ws, m, msg) {
  const { lat, lng } = msg;
  if (!finite(lat) || !finite(lng)) return sendError(ws, 'bad_message', 'lat/lng must be numbers');
  if (lat < -90 || lat > 90 || lng < -180 || lng > 180) return sendError(ws, 'out_of_range', 'lat/lng out of range');
  const heading = finite(msg.heading) && msg.heading >= 0 && msg.heading < 360 ? msg.heading : null;
  const accuracy = finite(msg.accuracy) && msg.accuracy >= 0 ? msg.accuracy : null;
  const seq = Number.isInteger(msg.seq) && msg.seq >= 0 ? msg.seq : null;
  const pin = { id: ws.pinId, lat, lng, heading, accuracy, name: ws.pinName, seq, ts: Date.now() };
  m.pins.set(ws.pinId, pin);
  broadcast(m, JSON.stringify({ type: 'update', pins: [pin], gone: [] }));
}

function onHello(ws, m, msg) {
  if (typeof msg.name !== 'string') return sendError(ws, 'bad_message', 'name must be a string');
  const name = msg.name.trim();
  if (name.length < 1 || name.length > 64) return sendError(ws, 'out_of_range', 'name length');
  ws.pinName = name;
  const pin = m.pins.get(ws.pinId);
  if (pin !== undefined) {
    pin.name = name;
    broadcast(m, JSON.stringify({ type: 'update', pins: [pin], gone: [] }));
  }
}

function onView(ws, m) {
  // No areas of interest: the answer is always the whole map.
  ws.send(JSON.stringify({ type: 'snapshot', pins: Array.from(m.pins.values()) }));
}

const server = http.createServer((req, res) => {
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not found');
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: MAX_MESSAGE });

server.on('upgrade', (req, socket, head) => {
  const match = MAP_PATH.exec(req.url);
  if (match === null) {
    socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const m = mapNamed(match[1]);
    ws.pinId = crypto.randomBytes(12).toString('base64url');
    ws.pinName = null;
    m.clients.add(ws);
    ws.send(JSON.stringify({ type: 'welcome', id: ws.pinId, pins: Array.from(m.pins.values()) }));

    ws.on('message', (data, isBinary) => {
      if (isBinary) return sendError(ws, 'bad_message', 'binary frames are not accepted');
      let msg;
      try {
        msg = JSON.parse(data.toString('utf8'));
      } catch (e) {
        return sendError(ws, 'bad_json', 'not JSON');
      }
      if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) return sendError(ws, 'bad_json', 'not a JSON object');
      if (msg.type === 'move') onMove(ws, m, msg);
      else if (msg.type === 'hello') onHello(ws, m, msg);
      else if (msg.type === 'view') onView(ws, m);
      else sendError(ws, 'bad_message', 'unknown type');
    });
    ws.on('error', () => {});
    ws.on('close', () => {
      m.clients.delete(ws);
      if (m.pins.delete(ws.pinId)) {
        broadcast(m, JSON.stringify({ type: 'update', pins: [], gone: [ws.pinId] }));
      }
      if (m.clients.size === 0) maps.delete(match[1]);
    });
  });
});

function shutdown() {
  for (const client of wss.clients) client.close(1001, 'going away');
  server.close();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen({ port: PORT, host: HOST, backlog: 4096 }, () => {
  process.stderr.write(`naive_ws listening on ${HOST}:${server.address().port}\n`);
});
