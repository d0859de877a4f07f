// livemap map page: one pin per person, live over WebSocket or SockJS.
//
// Plain ES2020 module, no build step. Leaflet is the global `L` (loaded by a
// deferred classic script before this module runs); SockJS is loaded only when
// the plain WebSocket cannot be used. The wire protocol is docs/protocol.md:
// welcome/update/snapshot/error in, hello/move out.
// The people list is people.js, the trails trails.js, the wording of
// distances and ages format.js, the "Share from a phone app" dialog share.js,
// a big map's canvas, clusters and names crowd.js (docs/architecture.md,
// "The page"); a big map also tells the server what it shows (`view`).

/* global L */

import {ago, duration, batteryLevel, sourceLabel} from './format.js';
import {PeoplePanel} from './people.js';
import {Trails} from './trails.js';
import {ShareDialog} from './share.js';
import {Crowd, placeDomLabels} from './crowd.js';

const NAME_KEY = 'livemap.name';
const APPROXIMATE_KEY = 'livemap.approximate';
const TTL_KEY = 'livemap.ttl';
const CREATED_KEY = 'livemap.created'; // sessionStorage: the map this tab just made
const TRAILS_KEY = 'livemap.trails';
// `hello` needs a name; someone who shares an approximate location without
// having typed one is called this.
const DEFAULT_NAME = 'Someone';
const APPROXIMATE_METRES = 1000;
const STALE_CHECK_MS = 15000; // how often "last seen N min ago" is brought up to date
const COPIED_MS = 2000;
const SENT_SEQS_KEPT = 32; // send times kept to match echoes of our own moves
const MAP_PATH = /^\/m\/([A-Za-z0-9_-]{1,64})$/;
// Street level: where a viewer alone on the map is shown, and the closest
// any automatic view (arrival, "Show everyone", following) comes.
const STREET_ZOOM = 15;
const TRAIL_MS = 10 * 60 * 1000;
const TICK_MS = 1000; // ages in the people list, "not live for", the trails' window
const HEADING_STEP = 5; // degrees: smaller heading-only changes are not sent
const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const WELCOME_TIMEOUT_MS = 8000; // a WebSocket that says nothing this long is as good as blocked
const TOAST_MS = 4000;
// A big map (docs/architecture.md, "The crowd"): from this many people the
// pins are drawn on a canvas and the page asks for its view only; under
// SMALL_AGAIN it is a small map again.
const BIG_FROM = 51;
const SMALL_AGAIN = 40;
const CLUSTERS_UNTIL_ZOOM = 18; // from this zoom up nothing is clustered (as on the server)
const CLUSTER_PREFIX = 'c:'; // a cluster's id; never a pin's
const HIDDEN_FRAME_MS = 250;
const ZOOM_MS = 1000; // longer than any of Leaflet's zoom animations (0.25 s)
const FIT_ALL_WAIT_MS = 5000; // "Show everyone" on a big map waits this long for the world
const VIEW_DELAY_MS = 300; // the view is told once the map rests this long
const VIEW_MARGIN = 0.25; // of the viewport's size, on each side: a short pan needs no new pins
const SOCKJS_SRC = '/vendor/sockjs-client/sockjs.min.js';
// Used when falling back: the plain WebSocket already failed, so SockJS's own
// websocket transport would only waste a round; iframe transports would need
// a page from the server that loads SockJS from a third-party host.
const SOCKJS_FALLBACK = ['xhr-streaming', 'xhr-polling'];
const SOCKJS_TRANSPORTS = new Set([
  'websocket', 'xhr-streaming', 'xdr-streaming', 'eventsource', 'iframe-eventsource',
  'htmlfile', 'iframe-htmlfile', 'xhr-polling', 'xdr-polling', 'iframe-xhr-polling',
  'jsonp-polling',
]);

// ---------------------------------------------------------------- settings

function readConfig() {
  // The server fills this in; opened any other way the page still works
  // against the map named in its path.
  let raw = {};
  try {
    raw = JSON.parse(document.getElementById('livemap-config').textContent) || {};
  } catch (err) {
    console.warn('livemap: unreadable config, using defaults', err);
  }
  const fromPath = /^\/m\/([A-Za-z0-9_-]{1,64})\/?$/.exec(location.pathname);
  const map = typeof raw.map === 'string' ? raw.map : (fromPath ? fromPath[1] : 'public');
  return {
    map,
    tiles: raw.tiles || 'https://tile.openstreetmap.org/{z}/{x}/{y}.png',
    attribution: raw.attribution ||
      '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors',
    rate: Number(raw.rate) > 0 ? Number(raw.rate) : 10,
    wsPath: raw.wsPath || `/ws/${map}`,
    sockjsPath: raw.sockjsPath || `/sockjs/${map}`,
    maxZoom: Number(raw.maxZoom) > 0 ? Number(raw.maxZoom) : 19,
    // Seconds after which a pin that has not moved is shown as stale.
    stale: Number(raw.stale) > 0 ? Number(raw.stale) : 600,
  };
}

const config = readConfig();
// Sent no faster than `rate` a second; the small margin keeps network jitter
// from bunching two sends into one of the server's rate windows.
const MOVE_INTERVAL_MS = 1000 / config.rate + 10;
// A visible page whose position has not changed says so again now and then,
// so that someone sitting still is not shown as stale (or expired) to others.
const KEEPALIVE_MS = Math.min(300000, Math.max(1000, config.stale * 1000 / 3));

// ?transport=websocket forces the plain WebSocket; ?transport=sockjs forces
// SockJS with its own choice of transports; a SockJS transport name forces
// SockJS with only that transport (sockjs-websocket: SockJS's websocket).
// null: automatic (WebSocket, falling back to SockJS).
const forced = (() => {
  const want = new URLSearchParams(location.search).get('transport');
  if (!want) return null;
  if (want === 'websocket') return {sockjs: false};
  if (want === 'sockjs') return {sockjs: true, transports: undefined};
  if (want === 'sockjs-websocket') return {sockjs: true, transports: ['websocket']};
  if (SOCKJS_TRANSPORTS.has(want)) return {sockjs: true, transports: [want]};
  console.warn(`livemap: unknown transport ${JSON.stringify(want)}, choosing automatically`);
  return null;
})();

// ---------------------------------------------------------------- the page

const $ = (id) => document.getElementById(id);
const ui = {
  name: $('name'),
  count: $('count'),
  status: $('status'),
  notice: $('notice'),
  toast: $('toast'),
  fitAll: $('fit-all'),
  compass: $('compass'),
  actions: $('actions'),
  pinTemplate: $('pin-template'),
  gone: $('gone'),
  goneText: $('gone-text'),
  goneLink: $('gone-link'),
  copyLink: $('copy-link'),
  copyText: $('copy-text'),
  linkBox: $('link-box'),
  linkField: $('link-field'),
  newMap: $('new-map'),
  ttl: $('new-map-ttl'),
  approximate: $('approximate'),
  trails: $('trails'),
  mapInfo: $('map-info'),
  panel: $('panel'),
  optionsToggle: $('options-toggle'),
  people: $('people'),
};

// Phones, upright or sideways (style.css has the same query): the people
// list starts as one line and closes again once someone is chosen.
const compactLayout = window.matchMedia('(max-width: 599px), (max-height: 499px)');

const map = L.map('map', {
  zoomControl: false,
  worldCopyJump: true,
  minZoom: 2,
  maxZoom: config.maxZoom,
}).setView([20, 0], 2);

L.tileLayer(config.tiles, {
  maxZoom: config.maxZoom,
  attribution: config.attribution,
}).addTo(map);

L.control.zoom({position: 'bottomright'}).addTo(map);

const ActionsControl = L.Control.extend({
  onAdd() {
    // Taps on the buttons must not reach the map (a map tap can place the pin).
    L.DomEvent.disableClickPropagation(ui.actions);
    L.DomEvent.disableScrollPropagation(ui.actions);
    return ui.actions;
  },
});
new ActionsControl({position: 'bottomright'}).addTo(map);

let toastTimer = null;
function toast(text) {
  ui.toast.textContent = text;
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { ui.toast.hidden = true; }, TOAST_MS);
}

function notice(text) {
  ui.notice.textContent = text || '';
  ui.notice.hidden = !text;
}

// ---------------------------------------------------------------- server clock

// A pin's `ts` is the server's clock, so its age is measured on the server's
// clock too: serverNow() = Date.now() + skew. The skew comes from the best
// evidence at hand, in this order:
// - the echo of one of our own moves: the server stamped `ts` between our
//   send and the echo's arrival, so skew lies in [ts - arrival, ts - send];
//   the middle of that interval is off by at most half a round trip;
// - until then, the Date header of a small request at start (1 s resolution);
// - always: no `ts` can be later than the server's now when it arrives, so
//   a pin from "the future" moves the estimate forward (a slow local clock).
// Date.now() rather than performance.now() carries the estimate forward,
// because it keeps counting while a laptop sleeps.
let skew = 0;
let skewFromEcho = false;
const sentSeqs = new Map(); // seq -> Date.now() when sent, on this connection

function serverNow() {
  return Date.now() + skew;
}

function skewInterval(low, high) {
  skew = (low + high) / 2;
}

function noteMoveSent(seqSent) {
  sentSeqs.set(seqSent, Date.now());
  if (sentSeqs.size > SENT_SEQS_KEPT) sentSeqs.delete(sentSeqs.keys().next().value);
}

function noteTs(pin) {
  if (!Number.isFinite(pin.ts)) return;
  const arrived = Date.now();
  if (pin.id === myId && sentSeqs.has(pin.seq)) {
    skewInterval(pin.ts - arrived, pin.ts - sentSeqs.get(pin.seq));
    skewFromEcho = true;
    for (const s of [...sentSeqs.keys()]) if (s <= pin.seq) sentSeqs.delete(s);
  }
  if (pin.ts - arrived > skew) skew = pin.ts - arrived;
}

function syncWithDateHeader(response, sentAt) {
  const date = Date.parse(response.headers.get('Date') || '');
  if (skewFromEcho || !Number.isFinite(date)) return;
  // The header is truncated to the second: the server's time was in [date, date + 1 s).
  skewInterval(date - Date.now(), date + 1000 - sentAt);
}

// ---------------------------------------------------------------- pins

/**
 * Every pin the page holds. `dom` is its marker (the pin's own DOM element)
 * on a small map, and on a big one only for the viewer and the person
 * followed; the rest of a big map is drawn by crowd.js.
 * @type {Map<string, {pin: object, at: L.LatLng, mx: number, my: number, stale: boolean,
 *   seen: string, labelSize: {w: number, h: number}|null, labelDx: number,
 *   labelHidden: boolean, dom: null|{marker: L.Marker, inner: Element, arrow: Element,
 *   body: Element, label: Element, name: Element, source: Element, battery: Element,
 *   age: Element}}>}
 */
const pins = new Map();
let myId = null;
// Date.now() when the connection dropped: every pin is then shown as it was
// ("not live"), the viewer's own too, until a welcome rebuilds the map.
let notLiveSince = null;
// The server's clusters of this page's view (docs/protocol.md, "Extension:
// clusters"), by id; `total` the number of pins on the whole map, when the
// server says (null: a server without the extension).
const clusters = new Map();
let total = null;
// A big map: past BIG_FROM people the pins are drawn on a canvas, and the
// page asks the server for its view only (with clusters) rather than every
// pin. It stays big until the map is clearly small again.
let bigMap = false;

// A DivIcon whose element says which pin it is, even when Leaflet rebuilds it.
const PinIcon = L.DivIcon.extend({
  createIcon(oldIcon) {
    const div = L.DivIcon.prototype.createIcon.call(this, oldIcon);
    div.dataset.pinId = this.options.pinId;
    return div;
  },
});

function normHeading(h) {
  if (typeof h !== 'number' || !Number.isFinite(h)) return null;
  const r = Math.round((((h % 360) + 360) % 360) * 10) / 10;
  return r >= 360 ? 0 : r;
}

function headingDelta(a, b) {
  const d = Math.abs(a - b) % 360;
  return d > 180 ? 360 - d : d;
}

function pinName(pin) {
  return typeof pin.name === 'string' && pin.name.trim() ? pin.name : '';
}

function pinLabel(pin) {
  return pinName(pin) || (pin.id === myId ? 'you' : 'anonymous');
}

// Our own arrow follows the compass at once rather than waiting for the echo.
function pinHeading(pin) {
  return pin.id === myId && sensorHeading !== null ? sensorHeading : normHeading(pin.heading);
}

// Whether a pin is its own DOM marker: every pin of a small map; on a big
// one the viewer and the person followed.
function wantsDom(id) {
  return !bigMap || id === myId || id === following;
}

function addDom(entry) {
  const pin = entry.pin;
  const content = ui.pinTemplate.content.firstElementChild.cloneNode(true);
  const mine = pin.id === myId;
  const marker = L.marker(entry.at, {
    icon: new PinIcon({
      pinId: pin.id,
      className: mine ? 'pin mine' : 'pin',
      html: content,
      iconSize: [32, 32],
      iconAnchor: [16, 16],
    }),
    interactive: false,
    keyboard: false,
  }).addTo(map);
  entry.dom = {
    marker,
    inner: content,
    body: content.querySelector('.pin-body'),
    arrow: content.querySelector('.pin-arrow'),
    label: content.querySelector('.pin-label'),
    name: content.querySelector('.pin-name'),
    source: content.querySelector('.pin-source'),
    battery: content.querySelector('.pin-battery'),
    age: content.querySelector('.pin-age'),
  };
  entry.labelSize = null;
  entry.labelDx = 0;
  entry.labelDy = 0;
  entry.labelHidden = false;
  entry.seen = null;
}

function dropDom(entry) {
  if (!entry.dom) return;
  entry.dom.marker.remove();
  entry.dom = null;
}

// A pin gets or loses its marker as the map turns big or small, or as it is
// followed or no longer.
function syncDom(entry) {
  const want = wantsDom(entry.pin.id);
  if (want && !entry.dom) {
    addDom(entry);
    renderPin(entry, entry.pin);
  } else if (!want && entry.dom) {
    dropDom(entry);
  }
}

function renderPin(entry, pin) {
  const mine = pin.id === myId;
  entry.pin = pin;
  entry.heading = pinHeading(pin);
  crowdChanged();
  const dom = entry.dom;
  if (!dom) {
    renderAge(entry, serverNow());
    return;
  }
  const heading = entry.heading;
  dom.body.classList.toggle('has-heading', heading !== null);
  if (heading !== null) dom.arrow.style.transform = `rotate(${heading}deg)`;
  // textContent, never innerHTML: names come from other people.
  const label = pinLabel(pin);
  if (dom.name.textContent !== label) {
    dom.name.textContent = label;
    entry.labelSize = null; // measured again when labels are placed
  }
  dom.name.classList.toggle('unnamed', !pinName(pin));
  // A pin fed by a phone app says which app, and the phone's battery if it told.
  const source = sourceLabel(pin.source) || '';
  const battery = batteryLevel(pin.battery);
  const batteryText = battery === null ? '' : `${battery}%`;
  if (dom.battery.textContent !== batteryText || dom.source.textContent !== source) {
    entry.labelSize = null; // measured again when names are placed
  }
  dom.source.textContent = source;
  dom.source.hidden = !source;
  dom.battery.textContent = batteryText;
  dom.battery.hidden = battery === null;
  dom.battery.classList.toggle('low', battery !== null && battery <= 15);
  const at = dom.marker.getLatLng();
  if (at.lat !== entry.at.lat || at.lng !== entry.at.lng) dom.marker.setLatLng(entry.at);
  dom.marker.setZIndexOffset(mine ? 1000 : following === pin.id ? 500 : 0);
  dom.inner.classList.toggle('followed', following === pin.id);
  entry.seen = null; // the name may have changed: say the age line again
  renderAge(entry, serverNow());
}

// A pin that has not moved for `stale` seconds is dimmed and says how old it
// is; while the connection is down, every pin says how long it has not been live.
function renderAge(entry, now) {
  const ts = entry.pin.ts;
  const age = Number.isFinite(ts) ? now - ts : 0;
  const stale = age >= config.stale * 1000;
  if (stale !== entry.stale) crowdChanged();
  entry.stale = stale;
  if (!entry.dom) return;
  let seen = stale ? `last seen ${ago(age)}` : '';
  if (notLiveSince !== null) seen = `not live for ${duration(Date.now() - notLiveSince)}`;
  if (seen === entry.seen) return;
  entry.seen = seen;
  entry.dom.inner.classList.toggle('stale', stale);
  if (entry.dom.age.textContent !== seen) {
    entry.dom.age.textContent = seen;
    entry.labelSize = null; // measured again when names are placed
  }
  entry.dom.inner.title = seen ? `${entry.dom.name.textContent}, ${seen}` : '';
}

function refreshAges() {
  const now = serverNow();
  for (const entry of pins.values()) renderAge(entry, now);
}

function upsertPin(pin) {
  if (!pin || typeof pin.id !== 'string' || !Number.isFinite(pin.lat) || !Number.isFinite(pin.lng)) {
    console.warn('livemap: ignoring malformed pin', pin);
    return;
  }
  noteTs(pin);
  let entry = pins.get(pin.id);
  const at = L.latLng(pin.lat, pin.lng);
  // Zoom-0 world pixels, once per move: crowd.js scales them to any zoom.
  const world = map.project(at, 0);
  if (!entry) {
    entry = {pin, at, mx: world.x, my: world.y, heading: null, stale: false, seen: null,
             dom: null, labelSize: null, labelDx: 0, labelDy: 0, labelHidden: false};
    pins.set(pin.id, entry);
    if (wantsDom(pin.id)) addDom(entry);
  }
  entry.at = at;
  entry.mx = world.x;
  entry.my = world.y;
  renderPin(entry, pin);
  // A big map keeps the trails of the viewer and of the person followed:
  // thousands of trails are a scribble, and ten minutes of each would be a lot to hold.
  if (!bigMap || pin.id === myId || pin.id === following) {
    trails.record(pin.id, pin.lat, pin.lng, pin.ts, pin.id === myId);
  }
  if (pin.id === following) keepFollowing(entry);
  if (pin.id === pendingFollow) {
    pendingFollow = null;
    follow(pin.id);
  }
  people.invalidate();
}

function removePin(id) {
  const entry = pins.get(id);
  if (entry) {
    dropDom(entry);
    pins.delete(id);
    crowdChanged();
    people.invalidate();
  }
}

// Someone left the map (an update's `gone`), or, on a big map, left the
// page's view or went into a cluster.
function pinGone(id) {
  const entry = pins.get(id);
  if (id === myId && entry && bigMap && connected) {
    return; // the viewer is always shown, where this page knows they are
  }
  if (id === following && entry) {
    stopFollowing();
    toast(bigMap && total !== null ? `${pinLabel(entry.pin)} is in a crowd: zoom in to see them`
      : `${pinLabel(entry.pin)} left the map`);
  }
  removePin(id);
  trails.remove(id);
}

function replacePins(list) {
  const keep = new Set((list || []).map((p) => p && p.id));
  if (bigMap && myId !== null && pins.has(myId)) keep.add(myId);
  for (const id of [...pins.keys()]) if (!keep.has(id)) removePin(id);
  for (const pin of list || []) upsertPin(pin);
}

function clearPins() {
  for (const id of [...pins.keys()]) removePin(id);
  clusters.clear();
}

function replaceClusters(list) {
  clusters.clear();
  for (const c of Array.isArray(list) ? list : []) addCluster(c);
  crowdChanged();
}

function addCluster(c) {
  if (!c || typeof c.id !== 'string' || !Number.isFinite(c.lat) || !Number.isFinite(c.lng) ||
      !Number.isFinite(c.count)) {
    console.warn('livemap: ignoring malformed cluster', c);
    return;
  }
  clusters.set(c.id, c);
  crowdChanged();
}

function showCount() {
  people.invalidate();
}

// ---------------------------------------------------------------- the crowd

// Big or small: past BIG_FROM people (on the whole map when the server says
// its total, else those the page holds) the map is big; it is small again
// only under SMALL_AGAIN, so that a map near the line does not flicker.
function updateSize() {
  const n = total !== null ? total : pins.size;
  const big = bigMap ? !(total !== null && n < SMALL_AGAIN) : n >= BIG_FROM;
  if (big === bigMap) return;
  bigMap = big;
  document.body.classList.toggle('big-map', big);
  for (const entry of pins.values()) syncDom(entry);
  crowd.setOn(big);
  crowdChanged();
  if (big) {
    showOwnHere();
    sendView();
  } else if (connected && lastView !== 'world') {
    // Small again: every pin, as v1, for the people list and "Show everyone".
    if (send({type: 'view', bbox: null})) lastView = 'world';
  }
}

const crowd = new Crowd(map, {
  label: (entry) => pinLabel(entry.pin),
  named: (entry) => pinName(entry.pin) !== '',
  onClusterTap(bounds) {
    viewTouched = true;
    stopFollowing();
    const z = map.getZoom();
    map.fitBounds(bounds.pad(0.1), {
      maxZoom: Math.max(z + 1, Math.min(CLUSTERS_UNTIL_ZOOM, config.maxZoom)),
      animate: true,
    });
  },
});

let crowdDirty = false;
function crowdChanged() {
  crowdDirty = true;
  requestFrame();
}

// Names of the DOM pins (every pin of a small map; the viewer and the
// person followed on a big one), the viewer's first (crowd.js,
// placeDomLabels); `marks`: the boxes of the cluster marks, which no name
// may cover. Returns the boxes taken, in container pixels.
function placeLabels(marks) {
  const focus = viewerAt();
  const rank = (e) => (e.pin.id === myId ? 0 : e.pin.id === following ? 1 : 2);
  return placeDomLabels(map, [...pins.values()].filter((e) => e.dom), focus, rank, marks);
}

// Incoming messages are applied at most once per animation frame: a burst
// of updates is merged (the latest state of each pin wins) and drawn once.
let frameQueued = false;
let pendingSnapshot = null; // {pins, clusters}: replaces everything, before pendingPins
const pendingPins = new Map(); // id -> pin, or null for a `gone`
const pendingClusters = new Map(); // id -> cluster, or null for a `gone`

function requestFrame() {
  if (frameQueued) return;
  frameQueued = true;
  // A hidden tab gets no animation frames: a timer keeps its state current.
  if (document.hidden) setTimeout(runFrame, HIDDEN_FRAME_MS);
  else requestAnimationFrame(runFrame);
}

function queueUpdate(msg) {
  for (const id of Array.isArray(msg.gone) ? msg.gone : []) {
    if (typeof id !== 'string') continue;
    if (id.startsWith(CLUSTER_PREFIX)) pendingClusters.set(id, null);
    else pendingPins.set(id, null);
  }
  for (const pin of Array.isArray(msg.pins) ? msg.pins : []) {
    if (pin && typeof pin.id === 'string') pendingPins.set(pin.id, pin);
    else console.warn('livemap: ignoring malformed pin', pin);
  }
  for (const c of Array.isArray(msg.clusters) ? msg.clusters : []) {
    if (c && typeof c.id === 'string') pendingClusters.set(c.id, c);
    else console.warn('livemap: ignoring malformed cluster', c);
  }
  requestFrame();
}

function queueSnapshot(msg) {
  pendingSnapshot = {pins: msg.pins, clusters: msg.clusters};
  pendingPins.clear();
  pendingClusters.clear();
  requestFrame();
}

function dropQueued() {
  pendingSnapshot = null;
  pendingPins.clear();
  pendingClusters.clear();
}

function runFrame() {
  frameQueued = false;
  let applied = false;
  if (pendingSnapshot) {
    const snapshot = pendingSnapshot;
    pendingSnapshot = null;
    replaceClusters(snapshot.clusters);
    replacePins(snapshot.pins);
    settlePins();
    applied = true;
    if (awaitingWorld) {
      awaitingWorld = false;
      arriveOnce();
    }
    if (fitAllPending) {
      fitAllPending = false;
      fitEveryone();
      clearTimeout(viewTimer);
      viewTimer = setTimeout(sendView, VIEW_DELAY_MS); // back to the view shown
    }
  }
  if (pendingPins.size || pendingClusters.size) {
    for (const [id, pin] of pendingPins) {
      if (pin) upsertPin(pin);
      else pinGone(id);
    }
    for (const [id, c] of pendingClusters) {
      if (c) addCluster(c);
      else clusters.delete(id);
    }
    pendingPins.clear();
    pendingClusters.clear();
    applied = true;
    crowdDirty = true;
  }
  if (applied) {
    refreshAges();
    updateSize();
  }
  if (!crowdDirty) return;
  // Mid-zoom the panes are being scaled: draw again once the zoom ends (a
  // zoom cut short by another may never say so: not longer than ZOOM_MS).
  if (zoomingSince !== null && performance.now() - zoomingSince < ZOOM_MS) {
    requestFrame();
    return;
  }
  zoomingSince = null;
  crowdDirty = false;
  if (!bigMap) {
    placeLabels([]);
    return;
  }
  const list = [];
  for (const e of pins.values()) if (!e.dom) list.push(e);
  const focus = viewerAt();
  const size = map.getSize();
  crowd.render({
    pins: list,
    clusters: total !== null ? [...clusters.values()] : null,
    focus: focus ? map.latLngToContainerPoint(focus) : L.point(size.x / 2, size.y / 2),
    reserved: placeLabels,
    area: freeArea(),
    dimAll: notLiveSince !== null,
  });
}

let zoomingSince = null;
map.on('zoomstart', () => { zoomingSince = performance.now(); });
map.on('zoomend moveend viewreset', () => { zoomingSince = null; });
for (const type of ['moveend', 'zoomend', 'resize', 'viewreset']) map.on(type, crowdChanged);

// ---------------------------------------------------------------- the view

// The part of the map that no panel or button covers, in pixels of the
// map's container (which fills the window): what "fit", "centre" and "in
// view" mean on this page. A panel as wide as most of the screen is a band
// at the top or the bottom (a phone held upright); a narrower one is a
// column at the left. The map's buttons are a band at the bottom right.
function freeArea() {
  const size = map.getSize();
  const area = {left: 0, top: 0, right: size.x, bottom: size.y};
  for (const el of [ui.panel, ui.people]) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    if (r.width > size.x * 0.6) {
      if (r.top + r.height / 2 < size.y / 2) area.top = Math.max(area.top, r.bottom);
      else area.bottom = Math.min(area.bottom, r.top);
    } else {
      area.left = Math.max(area.left, r.right);
    }
  }
  const buttons = ui.actions.closest('.leaflet-bottom');
  if (buttons) area.bottom = Math.min(area.bottom, buttons.getBoundingClientRect().top);
  return area;
}

// Room around each fitted pin: its dot above, its name label below.
const PIN_ROOM = {left: 28, top: 28, right: 28, bottom: 56};

function fitArea() {
  const free = freeArea();
  const size = map.getSize();
  const area = {
    left: free.left + PIN_ROOM.left,
    top: free.top + PIN_ROOM.top,
    right: free.right - PIN_ROOM.right,
    bottom: free.bottom - PIN_ROOM.bottom,
  };
  // A window too small for the panels: use all of it rather than nothing.
  if (area.right - area.left < 64 || area.bottom - area.top < 64) {
    return {left: 0, top: 0, right: size.x, bottom: size.y};
  }
  return area;
}

// Puts `latlng` in the middle of the free part of the map.
function centreOn(latlng, zoom, options) {
  const area = fitArea();
  const size = map.getSize();
  const offset = L.point((area.left + area.right - size.x) / 2, (area.top + area.bottom - size.y) / 2);
  const z = zoom === undefined ? map.getZoom() : zoom;
  const centre = map.unproject(map.project(latlng, z).subtract(offset), z);
  map.setView(centre, z, options);
}

// Shows all of `points`: no closer than street level, as close as they allow.
function fitPoints(points, options) {
  if (points.length === 1) {
    centreOn(points[0], Math.max(options.keepZoom ? map.getZoom() : 0, STREET_ZOOM), options);
    return;
  }
  const area = fitArea();
  const size = map.getSize();
  map.fitBounds(L.latLngBounds(points), {
    ...options,
    paddingTopLeft: [area.left, area.top],
    paddingBottomRight: [size.x - area.right, size.y - area.bottom],
    maxZoom: STREET_ZOOM,
  });
}

// Where the viewer is: the position this page has, else the pin the server has.
function viewerAt() {
  if (position) return L.latLng(position.lat, position.lng);
  const own = myId !== null ? pins.get(myId) : null;
  return own ? own.at : null;
}

// Every pin the page holds, and the corners of the server's clusters.
function everyone() {
  const points = [...pins.entries()].filter(([id]) => id !== myId).map(([, e]) => e.at);
  for (const c of clusters.values()) {
    if (Array.isArray(c.bbox) && c.bbox.length === 4 && c.bbox.every(Number.isFinite)) {
      points.push(L.latLng(c.bbox[1], c.bbox[0]), L.latLng(c.bbox[3], c.bbox[2]));
    } else {
      points.push(L.latLng(c.lat, c.lng));
    }
  }
  const me = viewerAt();
  if (me) points.push(me);
  return points;
}

// Arrival: the first fix, and the first welcome (the fix may come before or
// after it, or never), show the viewer and everyone else. After that the
// view is the viewer's: arrivals and moves never move it, except a person
// followed. Touching the map before then ends the arrival too.
let viewTouched = false;
let firstWelcome = true;

function arrive() {
  if (viewTouched) return;
  const points = everyone();
  if (points.length > 0) fitPoints(points, {animate: false});
}

for (const type of ['pointerdown', 'wheel', 'keydown']) {
  map.getContainer().addEventListener(type, (e) => {
    viewTouched = true;
    // The map's arrow keys pan it: that is the viewer choosing a view too.
    if (type === 'keydown' && e.key.startsWith('Arrow') && e.target === map.getContainer()) {
      stopFollowing();
    }
  }, {passive: true});
}

// "Show everyone": a big map asks the server for the whole world first
// (its clusters, or every pin), and fits that when it comes.
let fitAllPending = false;

function fitAll() {
  viewTouched = true;
  stopFollowing();
  if (bigMap && connected && send({type: 'view', bbox: null, zoom: viewZoom()})) {
    fitAllPending = true;
    // An answer that never comes (a connection lost meanwhile) holds nothing up.
    setTimeout(() => {
      if (!fitAllPending) return;
      fitAllPending = false;
      fitEveryone();
    }, FIT_ALL_WAIT_MS);
    return;
  }
  fitEveryone();
}

function fitEveryone() {
  const points = everyone();
  if (points.length === 0) {
    toast('Nobody is on the map yet');
    return;
  }
  fitPoints(points, {animate: true, keepZoom: true});
}
ui.fitAll.addEventListener('click', fitAll);

// ---------------------------------------------------------------- following

// The pin the map keeps in its middle, until the viewer pans, taps the
// person again, taps "stop", or asks for everyone.
let following = null;

function markFollowed() {
  for (const [id, entry] of pins) {
    syncDom(entry);
    if (!entry.dom) continue;
    entry.dom.inner.classList.toggle('followed', id === following);
    entry.dom.marker.setZIndexOffset(id === myId ? 1000 : id === following ? 500 : 0);
  }
  crowdChanged();
  people.invalidate();
}

function follow(id) {
  const entry = pins.get(id);
  if (!entry) return;
  if (following === id) {
    stopFollowing();
    return;
  }
  following = id;
  corrections = 0;
  viewTouched = true;
  markFollowed();
  if (people.isOpen && people.collapsible()) {
    // A phone: the whole map for the person followed; the bar says who it is.
    const hadFocus = ui.people.contains(document.activeElement);
    people.setOpen(false);
    if (hadFocus) $('people-toggle').focus();
  }
  // On a big map close enough that nothing is clustered: the person stays a pin.
  const closest = bigMap ? Math.min(CLUSTERS_UNTIL_ZOOM, config.maxZoom) : STREET_ZOOM;
  centreOn(entry.at, Math.max(map.getZoom(), closest), {animate: true});
}

// Someone found by the server's search but not sent to this page (outside
// its view, or in a cluster): go where they are, and follow them once
// their pin arrives.
let pendingFollow = null;

function goFollow(person) {
  pendingFollow = person.id;
  viewTouched = true;
  stopFollowing();
  if (people.isOpen && people.collapsible()) people.setOpen(false);
  centreOn(L.latLng(person.lat, person.lng), Math.min(CLUSTERS_UNTIL_ZOOM, config.maxZoom),
           {animate: false});
}

function keepFollowing(entry) {
  corrections = 0;
  centreOn(entry.at, undefined, {animate: true});
}

// An animation cut short (a new move in the middle of a zoom, a pinch) can
// leave the person off the middle: put them back when the map comes to
// rest, a few times at most (a pole is as far as the map goes).
let corrections = 0;
map.on('moveend', () => {
  const entry = following !== null ? pins.get(following) : null;
  if (!entry || corrections >= 3) return;
  const at = map.latLngToContainerPoint(entry.at);
  const area = fitArea();
  if (Math.abs(at.x - (area.left + area.right) / 2) > 1 ||
      Math.abs(at.y - (area.top + area.bottom) / 2) > 1) {
    corrections++;
    centreOn(entry.at, undefined, {animate: true});
  }
});

function stopFollowing() {
  if (following === null) return;
  following = null;
  markFollowed();
}

map.on('dragstart', () => {
  viewTouched = true;
  stopFollowing();
});

// ---------------------------------------------------------------- people and trails

const people = new PeoplePanel({
  root: ui.people,
  toggle: $('people-toggle'),
  count: ui.count,
  summary: $('people-summary'),
  body: $('people-body'),
  list: $('people-list'),
  searchBox: $('people-search-box'),
  search: $('people-search'),
  more: $('people-more'),
  unfollow: $('unfollow'),
  template: $('person-template'),
}, {
  compact: () => compactLayout.matches,
  people: () => [...pins.values()].map(({pin}) => personOf(pin)),
  total: () => total,
  search: searchServer,
  context: () => {
    const at = viewerAt();
    return {
      origin: at ? {lat: at.lat, lng: at.lng} : null,
      now: serverNow(),
      following,
      notLiveFor: notLiveSince === null ? null : Date.now() - notLiveSince,
      stale: config.stale * 1000,
    };
  },
  choose: (id, person) => {
    if (pins.has(id)) follow(id);
    else if (person) goFollow(person);
  },
  unfollow: stopFollowing,
  changed: layoutChanged,
});

function personOf(pin) {
  return {
    id: pin.id,
    mine: pin.id === myId,
    label: pinLabel(pin),
    named: pinName(pin) !== '',
    lat: pin.lat,
    lng: pin.lng,
    ts: pin.ts,
    accuracy: pin.accuracy,
    source: pin.source,
    battery: pin.battery,
  };
}

// The server's people search (docs/protocol.md, "Extension: clusters"):
// names the page is not sent, nearest first. null: this server has none
// (a 404 once is enough to stop asking), and the list searches what it holds.
let searchable = true;

function searchServer(query) {
  if (!searchable) return null;
  const at = viewerAt() || map.getCenter();
  const params = new URLSearchParams({q: query, near: `${at.lat.toFixed(5)},${at.lng.toFixed(5)}`,
                                      limit: '100'});
  return fetch(`/api/maps/${encodeURIComponent(config.map)}/people?${params}`, {cache: 'no-store'})
    .then((response) => {
      if (response.status === 404) searchable = false;
      if (!response.ok) return response.text().then(() => null);
      return response.json().then((body) => (body && Array.isArray(body.people)
        ? body.people.filter((p) => p && typeof p.id === 'string' && Number.isFinite(p.lat) &&
                             Number.isFinite(p.lng)).map(personOf)
        : null));
    })
    .catch((err) => {
      console.warn('livemap: people search', err);
      return null;
    });
}

const trails = new Trails(map, {windowMs: TRAIL_MS, now: serverNow});

// The map's buttons stay above the people sheet of a phone held upright.
function layoutChanged() {
  const r = ui.people.getBoundingClientRect();
  const atBottom = r.width > window.innerWidth * 0.6 && r.top > window.innerHeight / 2;
  const inset = atBottom ? Math.max(0, window.innerHeight - r.top) : 0;
  document.documentElement.style.setProperty('--sheet-inset', `${Math.round(inset)}px`);
  // An open sheet leaves little map: its buttons make way (pinch zooms, and
  // the list itself is the way to everyone) until the sheet closes.
  document.documentElement.classList.toggle('sheet-open', atBottom && people.isOpen);
}
if (typeof ResizeObserver === 'function') new ResizeObserver(layoutChanged).observe(ui.people);
window.addEventListener('resize', layoutChanged);

function setPanelOpen() {
  people.setOpen(!compactLayout.matches);
}
compactLayout.addEventListener('change', setPanelOpen);

ui.optionsToggle.addEventListener('click', () => {
  const open = !ui.panel.classList.contains('options-open');
  ui.panel.classList.toggle('options-open', open);
  ui.optionsToggle.setAttribute('aria-expanded', String(open));
});

ui.trails.checked = load('localStorage', TRAILS_KEY) === '1';
ui.trails.addEventListener('change', () => {
  save('localStorage', TRAILS_KEY, ui.trails.checked ? '1' : '0');
  trails.setVisible(ui.trails.checked);
});

// ---------------------------------------------------------------- own state

let position = null; // {lat, lng, accuracy}
let gpsHeading = null;
let sensorHeading = null;
let seq = 0;
let lastSent = null; // the move the server last got on this connection
let lastSentAt = -Infinity;
let sendTimer = null;
let placeByClick = false;
let hadFix = false;
let positionLive = false; // the position still holds: a fix without a later error, or a tap

function currentHeading() {
  return sensorHeading !== null ? sensorHeading : gpsHeading;
}

// The same grid as the server's (livemap_tx/privacy.py): latitude in steps
// of `metres`, longitude in steps that are `metres` wide at that latitude.
function coarsen(lat, lng, metres) {
  const PER_DEGREE = 111320;
  const latStep = metres / PER_DEGREE;
  const snappedLat = Math.max(-90, Math.min(90, Math.round(lat / latStep) * latStep));
  const width = PER_DEGREE * Math.cos(snappedLat * Math.PI / 180);
  const lngStep = width > 1e-6 ? Math.min(360, metres / width) : 360;
  let snappedLng = Math.round(lng / lngStep) * lngStep;
  if (snappedLng > 180) snappedLng -= 360;
  if (snappedLng < -180) snappedLng += 360;
  const seven = (x) => Math.round(x * 1e7) / 1e7;
  return {lat: seven(snappedLat), lng: seven(snappedLng)};
}

// What the server is told: an approximate location is coarsened here as
// well as on the server (which does it anyway, asked by `hello`), so the
// true position never leaves the device.
function outgoing() {
  if (!approximate()) return position;
  const at = coarsen(position.lat, position.lng, APPROXIMATE_METRES);
  const accuracy = position.accuracy === null
    ? APPROXIMATE_METRES : Math.max(position.accuracy, APPROXIMATE_METRES);
  return {lat: at.lat, lng: at.lng, accuracy};
}

function moveChanged() {
  if (!position) return false;
  if (!lastSent) return true;
  const out = outgoing();
  if (out.lat !== lastSent.lat || out.lng !== lastSent.lng ||
      out.accuracy !== lastSent.accuracy) return true;
  const h = currentHeading();
  if ((h === null) !== (lastSent.heading === null)) return true;
  return h !== null && headingDelta(h, lastSent.heading) >= HEADING_STEP;
}

// Throttle: at most one move per MOVE_INTERVAL_MS, and the last change in a
// burst is always sent (the timer reads the state when it fires).
function requestSend() {
  if (!connected || sendTimer !== null || !moveChanged()) return;
  const wait = lastSentAt + MOVE_INTERVAL_MS - performance.now();
  if (wait <= 0) {
    flushMove();
  } else {
    sendTimer = setTimeout(() => { sendTimer = null; flushMove(); }, wait);
  }
}

function flushMove() {
  if (!connected || !moveChanged()) return;
  const out = outgoing();
  const move = {
    type: 'move',
    lat: out.lat,
    lng: out.lng,
    heading: currentHeading(),
    accuracy: out.accuracy,
    seq: seq++,
  };
  if (send(move)) {
    lastSent = move;
    lastSentAt = performance.now();
    noteMoveSent(move.seq);
  }
}

// Someone sitting still sends no moves, and would look stale to everyone:
// while the page is in view and the position still holds, say it again.
function keepAlive() {
  if (!connected || !position || !positionLive || document.visibilityState !== 'visible') return;
  if (performance.now() - lastSentAt < KEEPALIVE_MS) return;
  lastSent = null;
  requestSend();
}

function setPosition(lat, lng, accuracy) {
  position = {
    lat: Math.max(-90, Math.min(90, lat)),
    lng: Math.max(-180, Math.min(180, lng)),
    accuracy: typeof accuracy === 'number' && Number.isFinite(accuracy) && accuracy >= 0
      ? Math.round(accuracy * 10) / 10 : null,
  };
  const own = myId !== null ? pins.get(myId) : null;
  if (own && !connected) {
    // Not live: the server cannot be told, but the viewer sees where they are.
    own.at = L.latLng(position.lat, position.lng);
    if (own.dom) own.dom.marker.setLatLng(own.at);
    crowdChanged();
  } else {
    showOwnHere();
  }
  people.invalidate();
  requestSend();
}

// On a big map the server may send the viewer's own pin inside a cluster,
// or not at all: the page shows it where it knows the viewer is (what the
// others see: approximate when shared approximately), echo or no echo.
function showOwnHere() {
  if (!bigMap || !connected || myId === null || !position) return;
  const out = outgoing();
  const own = pins.get(myId);
  const name = own ? own.pin.name : ui.name.value.trim();
  upsertPin({...(own ? own.pin : {}), id: myId, lat: out.lat, lng: out.lng,
             heading: currentHeading(), accuracy: out.accuracy, name: name || undefined,
             seq: undefined, ts: serverNow()});
}

// ---------------------------------------------------------------- geolocation

function onFix(pos) {
  const c = pos.coords;
  positionLive = true;
  placeByClick = false;
  document.body.classList.remove('place-by-click');
  notice('');
  gpsHeading = normHeading(c.heading);
  setPosition(c.latitude, c.longitude, c.accuracy);
  if (!hadFix) {
    hadFix = true;
    arrive();
  }
}

function letUserPlace(why) {
  if (hadFix && !placeByClick && why !== 'denied') {
    // We had a position: a slow or lost next fix (a tunnel) is no reason to
    // interrupt anyone; the last position stands until a new one comes.
    return;
  }
  placeByClick = true;
  document.body.classList.add('place-by-click');
  const text = {
    denied: 'Location access is off. Tap the map to place yourself.',
    unavailable: 'Your position is not available. Tap the map to place yourself.',
    timeout: 'No location fix yet. Tap the map to place yourself.',
    unsupported: 'This browser cannot share its location. Tap the map to place yourself.',
  }[why];
  notice(text);
}

function onGeoError(err) {
  // Expected in the field (no permission, indoors): a warning, not an error.
  console.warn('livemap: geolocation', err.code, err.message);
  if (!placeByClick) positionLive = false; // the last fix stands, but is not renewed
  const why = err.code === 1 ? 'denied' : err.code === 3 ? 'timeout' : 'unavailable';
  letUserPlace(why);
}

map.on('click', (e) => {
  if (!placeByClick) return;
  const at = e.latlng.wrap();
  positionLive = true;
  setPosition(at.lat, at.lng, null);
  notice('');
});

let geoWatch = null;

function startGeolocation() {
  if (!('geolocation' in navigator)) {
    letUserPlace('unsupported');
    return;
  }
  geoWatch = navigator.geolocation.watchPosition(onFix, onGeoError, {
    enableHighAccuracy: true,
    maximumAge: 5000,
    timeout: 20000,
  });
}

// ---------------------------------------------------------------- heading

function screenAngle() {
  const angle = screen.orientation ? screen.orientation.angle : window.orientation;
  return typeof angle === 'number' ? angle : 0;
}

function setSensorHeading(h) {
  const heading = normHeading(h);
  if (heading === null) return;
  sensorHeading = heading;
  const own = myId !== null ? pins.get(myId) : null;
  if (own) renderPin(own, own.pin);
  requestSend();
}

function startCompass() {
  if ('ondeviceorientationabsolute' in window) {
    // Android/Chrome: alpha is counter-clockwise from north.
    window.addEventListener('deviceorientationabsolute', (e) => {
      if (typeof e.alpha === 'number') setSensorHeading(360 - e.alpha + screenAngle());
    });
    return;
  }
  const listenWebkit = () => {
    window.addEventListener('deviceorientation', (e) => {
      if (typeof e.webkitCompassHeading === 'number') {
        setSensorHeading(e.webkitCompassHeading + screenAngle());
      }
    });
  };
  if (typeof DeviceOrientationEvent !== 'undefined' &&
      typeof DeviceOrientationEvent.requestPermission === 'function') {
    // iOS 13+: the compass needs a permission that only a tap may ask for.
    ui.compass.hidden = false;
    ui.compass.addEventListener('click', () => {
      DeviceOrientationEvent.requestPermission().then((state) => {
        if (state === 'granted') {
          ui.compass.hidden = true;
          listenWebkit();
        } else {
          toast('Compass access was not allowed');
        }
      }).catch((err) => {
        console.warn('livemap: compass permission', err);
        toast('Compass is not available');
      });
    });
  } else if ('ondeviceorientation' in window) {
    listenWebkit();
  }
}

// ---------------------------------------------------------------- name and privacy

function load(storage, key) {
  try {
    return window[storage].getItem(key);
  } catch (err) {
    return null; // storage blocked (private mode): the setting just isn't kept
  }
}

function save(storage, key, value) {
  try {
    window[storage].setItem(key, value);
  } catch (err) { /* not kept; still used */ }
}

function approximate() {
  return ui.approximate.checked;
}

// What this connection was last told in a `hello`: {name, precision}.
let lastHello = null;
let nameTimer = null;

// `hello` carries the name and, as livemap's extension, the precision in
// metres the server coarsens our positions to (0: the server's own).
function sendHello() {
  clearTimeout(nameTimer);
  const typed = ui.name.value.trim();
  save('localStorage', NAME_KEY, typed);
  if (!connected) return;
  const precision = approximate() ? APPROXIMATE_METRES : 0;
  // Back to precise needs a hello too, and a hello needs a name.
  const needed = precision > 0 || (lastHello !== null && lastHello.precision > 0);
  const name = typed || (needed ? (lastHello && lastHello.name) || DEFAULT_NAME : '');
  if (!name) return;
  if (lastHello && lastHello.name === name && lastHello.precision === precision) return;
  const hello = {type: 'hello', name};
  if (needed) hello.precision = precision;
  if (send(hello)) lastHello = {name, precision};
}

ui.name.value = load('localStorage', NAME_KEY) || '';
ui.name.addEventListener('input', () => {
  clearTimeout(nameTimer);
  nameTimer = setTimeout(sendHello, 600);
});
ui.name.addEventListener('change', sendHello);
ui.name.addEventListener('keydown', (e) => {
  if (e.key === 'Enter') ui.name.blur();
});

ui.approximate.checked = load('localStorage', APPROXIMATE_KEY) === '1';
ui.approximate.addEventListener('change', () => {
  save('localStorage', APPROXIMATE_KEY, approximate() ? '1' : '0');
  sendHello(); // first, so the server knows before the position comes again
  // Replace the pin the server holds now with one of the new precision.
  lastSent = null;
  requestSend();
  toast(approximate()
    ? 'Others now see you only to about 1 km'
    : 'Others now see your exact location');
});

// ---------------------------------------------------------------- connection

let link = null; // {transport, sockjs, send(text), close()}
let connected = false; // welcomed on the current link
let attempt = 0; // bumps on every new link, so late events of an old one are ignored
let failures = 0;
let useSockjs = forced !== null && forced.sockjs;
let retryTimer = null;
let retryAt = 0;
let countdownTimer = null;
let sockjsLoading = null;
let closedFor = null; // 'expired' or 'missing' once the map is gone: no more reconnecting
let wsFailedWhileUp = 0; // WebSocket failures before a welcome while the server answered

function setStatus(kind, text) {
  ui.status.className = `status status-${kind}`;
  ui.status.textContent = text;
}

function transportLabel(l) {
  return l.sockjs ? `SockJS ${l.transport}` : 'WebSocket';
}

function send(message) {
  if (!link || !connected) return false;
  try {
    link.send(JSON.stringify(message));
    return true;
  } catch (err) {
    console.warn('livemap: send failed', err);
    return false;
  }
}

function onFrame(text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch (err) {
    console.warn('livemap: unreadable frame', text);
    return;
  }
  if (!msg || typeof msg !== 'object') return;
  switch (msg.type) {
    case 'welcome':
      onWelcome(msg);
      break;
    case 'update':
      if (!connected) return;
      noteTotal(msg);
      queueUpdate(msg);
      break;
    case 'snapshot':
      if (!connected) return;
      noteTotal(msg);
      queueSnapshot(msg);
      break;
    case 'error':
      console.warn('livemap: server says', msg.code, msg.message);
      toast(msg.message ? `Server: ${msg.message}` : `Server error: ${msg.code}`);
      break;
    default:
      console.warn('livemap: unknown message type', msg.type);
  }
}

// The number of pins on the whole map, from a server with the clusters
// extension; a server without it never says (null).
function noteTotal(msg) {
  const n = Number.isFinite(msg.total) && msg.total >= 0 ? msg.total : null;
  if (n !== total) {
    total = n;
    people.invalidate();
  }
}

// A welcome of a clustered view on what turns out to be a small map: the
// page asks for every pin (v1's view) and arrives once they are there.
let awaitingWorld = false;

function onWelcome(msg) {
  connected = true;
  dropQueued();
  failures = 0;
  wsFailedWhileUp = 0;
  if (link.sockjs) useSockjs = true; // it worked: stay on it for this page's life
  setStatus('connected', `connected \u00b7 ${transportLabel(link)}`);
  sentSeqs.clear();
  // The map is rebuilt from the welcome, as it is now: the pins that were
  // kept while the connection was down go, and the own pin has a new id.
  const oldId = myId;
  myId = typeof msg.id === 'string' ? msg.id : String(msg.id);
  if (oldId !== null) trails.rename(oldId, myId);
  if (oldId !== null && following === oldId) following = myId;
  notLiveSince = null;
  document.body.classList.remove('not-live');
  crowdChanged();
  noteTotal(msg);
  clearPins(); // the own pin's look may change with the new id
  replaceClusters(msg.clusters);
  replacePins(msg.pins);
  settlePins();
  refreshAges();
  lastView = null;
  fitAllPending = false;
  updateSize();
  awaitingWorld = false;
  if (!bigMap && (total !== null || clusters.size > 0)) {
    // A small map: every pin, as v1 (the welcome was for a clustered view).
    awaitingWorld = clusters.size > 0 || total > pins.size;
    if (lastView !== 'world' && send({type: 'view', bbox: null})) lastView = 'world';
  }
  if (!awaitingWorld) arriveOnce();
  if (bigMap) {
    clearTimeout(viewTimer);
    viewTimer = setTimeout(sendView, VIEW_DELAY_MS); // the view of the arrival, or as it was
  }
  // A new connection knows nothing of us: say who and where we are again,
  // the hello first, so that an approximate location is never sent exactly.
  lastHello = null;
  lastSent = null;
  sendHello();
  requestSend();
}

function arriveOnce() {
  if (firstWelcome) {
    firstWelcome = false;
    arrive();
  }
}

// ---------------------------------------------------------------- the view sent

// What the page shows, as the server's `view` (docs/protocol.md, "Extension:
// clusters"): the viewport with a margin, and the zoom. Only a big map says
// it: a small one gets every pin, as in v1.
let lastView = null;
let viewTimer = null;

function viewZoom() {
  return Math.max(0, Math.min(22, Math.round(map.getZoom())));
}

function viewBox() {
  const b = map.getBounds().pad(VIEW_MARGIN);
  const round = (x) => Math.round(x * 1e5) / 1e5;
  const south = round(Math.max(-90, b.getSouth()));
  const north = round(Math.min(90, b.getNorth()));
  let west = b.getWest();
  let east = b.getEast();
  if (east - west >= 360) {
    west = -180;
    east = 180;
  } else {
    const wrap = (x) => ((((x + 180) % 360) + 360) % 360) - 180;
    west = wrap(west);
    east = wrap(east);
    if (east === -180) east = 180;
  }
  return [round(west), south, round(east), north];
}

function sendView() {
  clearTimeout(viewTimer);
  viewTimer = null;
  // Before the arrival the view is the world's, about to change: not worth a snapshot.
  if (!connected || !bigMap || fitAllPending || firstWelcome) return;
  const view = {type: 'view', bbox: viewBox(), zoom: viewZoom()};
  const key = JSON.stringify(view);
  if (key === lastView) return;
  if (send(view)) lastView = key;
}

map.on('moveend', () => {
  clearTimeout(viewTimer);
  viewTimer = setTimeout(sendView, VIEW_DELAY_MS);
});

// The WebSocket's query: the same view, so that the welcome is already for it.
function viewQuery() {
  if (!bigMap && !firstWelcome) return ''; // a small map: every pin
  const [w, s, e, n] = viewBox();
  return `?bbox=${w},${s},${e},${n}&zoom=${viewZoom()}`;
}

// After a welcome or a snapshot replaced the pins: trails and the person
// followed go with the pins that are no longer there (the own pin comes
// back with our next move).
function settlePins() {
  const ids = new Set(pins.keys());
  ids.add(myId);
  trails.keepOnly(ids);
  if (following !== null && !ids.has(following)) {
    stopFollowing();
    toast(bigMap && total !== null ? 'The person you followed is in a crowd: zoom in to see them'
      : 'The person you followed is no longer on the map');
  }
}

// Whether the map still exists: false only on a 404 (never made, or
// expired); null when the server cannot be asked (then we keep trying).
// Asked only when a connection was refused, as it answers with every pin.
function mapExists() {
  const sentAt = Date.now();
  return fetch(`/api/maps/${encodeURIComponent(config.map)}/pins`, {cache: 'no-store'})
    .then((response) => {
      syncWithDateHeader(response, sentAt);
      // Read to the end: an unread body keeps the request open until the page goes.
      return response.text().then(() => response.status !== 404);
    }).catch(() => null);
}

// The server's clock from the smallest answer it has, before any echo.
function askServerTime() {
  const sentAt = Date.now();
  fetch('/healthz', {cache: 'no-store'})
    .then((response) => {
      syncWithDateHeader(response, sentAt);
      return response.text();
    })
    .catch(() => { /* the echo of our first move will tell */ });
}

function linkDown(myAttempt, l, hadWelcome, code, reason) {
  if (myAttempt !== attempt) return;
  attempt++; // ignore anything further from this link
  link = null;
  connected = false;
  clearTimeout(sendTimer);
  sendTimer = null;
  if (notLiveSince === null && hadWelcome) {
    // Everyone stays where they were last seen, the viewer too, shown as not live.
    notLiveSince = Date.now();
    document.body.classList.add('not-live');
    crowdChanged(); // the crowd dims too
    refreshAges();
    people.invalidate();
  }
  if (code === 1008 && reason === 'map expired') {
    mapGone('expired');
    return;
  }
  if (hadWelcome) {
    scheduleReconnect();
    return;
  }
  // Refused before a welcome: a map that is gone refuses every upgrade, and
  // the browser does not say why; the API does.
  const myCheck = attempt;
  setStatus('connecting', 'connecting\u2026');
  mapExists().then((exists) => {
    if (myCheck !== attempt || closedFor) return;
    if (exists === false) {
      mapGone('missing');
    } else if (exists === true && !l.sockjs && forced === null) {
      // The server answers, but WebSocket never got as far as a welcome: a
      // network that blocks it, or a server just back from a restart that
      // refused the upgrade a moment before it answered this. Unless it
      // stalled (a proxy), try WebSocket once more; a second such failure
      // means the network: quietly try SockJS. (A server that cannot be
      // reached at all, say while it restarts, is no reason to leave WebSocket.)
      if (l.silent || ++wsFailedWhileUp >= 2) openSockjs();
      else openWebSocket();
    } else {
      scheduleReconnect();
    }
  });
}

// The map expired or never was: say so, stop reconnecting and locating.
function mapGone(why) {
  closedFor = why;
  attempt++;
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  retryTimer = null;
  if (link) link.close();
  link = null;
  connected = false;
  stopFollowing();
  dropQueued();
  clearPins();
  trails.keepOnly(new Set());
  notLiveSince = null;
  document.body.classList.remove('not-live');
  if (geoWatch !== null) navigator.geolocation.clearWatch(geoWatch);
  geoWatch = null;
  placeByClick = false;
  document.body.classList.remove('place-by-click');
  document.body.classList.add('map-closed');
  notice('');
  setStatus('closed', why === 'expired' ? 'map expired' : 'no such map');
  ui.goneText.textContent = why === 'expired'
    ? 'This map has expired: its link no longer works.'
    : 'This map does not exist, or it has expired.';
  ui.goneLink.hidden = config.map === 'public';
  ui.gone.hidden = false;
  share.mapGone();
}

function scheduleReconnect() {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** failures);
  failures++;
  // Jitter spreads the reconnects of a whole map after a server restart.
  const delay = Math.min(BACKOFF_MAX_MS, base * (0.75 + Math.random() * 0.5));
  retryAt = performance.now() + delay;
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, delay);
  showCountdown();
  clearInterval(countdownTimer);
  countdownTimer = setInterval(showCountdown, 1000);
}

function showCountdown() {
  const s = Math.max(1, Math.ceil((retryAt - performance.now()) / 1000));
  setStatus('reconnecting', `reconnecting in ${s} s`);
}

function connect() {
  if (closedFor) return;
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  retryTimer = null;
  if (useSockjs) openSockjs();
  else openWebSocket();
}

function openWebSocket() {
  const myAttempt = ++attempt;
  setStatus('connecting', 'connecting\u2026');
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = `${scheme}//${location.host}${config.wsPath}${viewQuery()}`;
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (err) {
    console.warn('livemap: WebSocket unavailable', err);
    setTimeout(() => linkDown(myAttempt, {sockjs: false}, false), 0);
    return;
  }
  const l = {
    transport: 'websocket',
    sockjs: false,
    send: (text) => ws.send(text),
    close: () => ws.close(),
  };
  link = l;
  let welcomed = false;
  const silence = setTimeout(() => {
    if (myAttempt === attempt && !welcomed) {
      console.warn('livemap: no welcome over WebSocket');
      l.silent = true; // it opened and stalled: no restart looks like that
      ws.close();
      linkDown(myAttempt, l, false);
    }
  }, WELCOME_TIMEOUT_MS);
  ws.onmessage = (e) => {
    if (myAttempt !== attempt) return;
    if (typeof e.data !== 'string') return;
    if (!welcomed) {
      welcomed = true;
      clearTimeout(silence);
    }
    onFrame(e.data);
  };
  ws.onclose = (e) => {
    clearTimeout(silence);
    if (myAttempt === attempt && welcomed) {
      console.info('livemap: connection closed', e.code, e.reason);
    }
    linkDown(myAttempt, l, welcomed, e.code, e.reason);
  };
}

function loadSockjs() {
  if (window.SockJS) return Promise.resolve(window.SockJS);
  if (!sockjsLoading) {
    sockjsLoading = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = SOCKJS_SRC;
      script.async = true;
      script.onload = () => resolve(window.SockJS);
      script.onerror = () => {
        sockjsLoading = null;
        script.remove();
        reject(new Error('could not load SockJS'));
      };
      document.head.appendChild(script);
    });
  }
  return sockjsLoading;
}

function openSockjs() {
  const myAttempt = ++attempt;
  setStatus('connecting', 'connecting\u2026');
  const pending = {sockjs: true, transport: 'sockjs'};
  loadSockjs().then((SockJS) => {
    if (myAttempt !== attempt) return;
    const transports = forced !== null ? forced.transports : SOCKJS_FALLBACK;
    const sock = new SockJS(`${location.origin}${config.sockjsPath}`, null, {transports});
    const l = {
      transport: 'sockjs',
      sockjs: true,
      send: (text) => sock.send(text),
      close: () => sock.close(),
    };
    link = l;
    let welcomed = false;
    sock.onopen = () => {
      l.transport = sock.transport || 'sockjs';
    };
    sock.onmessage = (e) => {
      if (myAttempt !== attempt) return;
      l.transport = sock.transport || l.transport;
      welcomed = true;
      onFrame(e.data);
    };
    sock.onclose = (e) => {
      if (myAttempt === attempt) console.info('livemap: SockJS closed', e.code, e.reason);
      linkDown(myAttempt, l, welcomed, e.code, e.reason);
    };
  }).catch((err) => {
    console.warn('livemap:', err.message);
    linkDown(myAttempt, pending, false);
  });
}

// Back online: no need to sit out the rest of the back-off.
window.addEventListener('online', () => {
  if (retryTimer !== null) connect();
});

// ---------------------------------------------------------------- sharing

// The map's link is its name: never the query string (?transport=...).
function mapLink() {
  return location.origin + location.pathname;
}

let copiedTimer = null;
function showCopied() {
  ui.copyLink.classList.add('copied');
  ui.copyText.textContent = 'Copied';
  toast('Link copied: send it to the people you want on this map');
  clearTimeout(copiedTimer);
  copiedTimer = setTimeout(() => {
    ui.copyLink.classList.remove('copied');
    ui.copyText.textContent = 'Copy link';
  }, COPIED_MS);
}

// Where the Clipboard API is missing (plain http on a LAN address) or
// refuses, the link is shown selected, ready for the system's own copy.
function showLinkBox() {
  ui.linkField.value = mapLink();
  ui.linkBox.hidden = false;
  ui.linkField.focus();
  ui.linkField.select();
}

function copyLink() {
  const text = mapLink();
  if (!navigator.clipboard || typeof navigator.clipboard.writeText !== 'function') {
    showLinkBox();
    return;
  }
  navigator.clipboard.writeText(text).then(showCopied, (err) => {
    console.warn('livemap: clipboard', err);
    showLinkBox();
  });
}
ui.copyLink.addEventListener('click', copyLink);
ui.linkField.addEventListener('focus', () => ui.linkField.select());
ui.linkField.addEventListener('keydown', (e) => {
  if (e.key === 'Escape') ui.linkBox.hidden = true;
});
ui.linkField.addEventListener('copy', () => {
  toast('Link copied: send it to the people you want on this map');
});

// ---------------------------------------------------------------- phone apps

// "Share from a phone app": a device for this map, named as the viewer is
// (share.js). The page itself needs nothing of it: the device's pin comes
// in updates like anyone's.
const share = new ShareDialog({
  dialog: $('share-dialog'),
  openers: [$('share-app'), $('share-app-wide')],
  status: $('share-status'),
  retry: $('share-retry'),
  apps: $('share-apps'),
  remove: $('share-delete'),
  pinName: $('share-pin-name'),
}, {
  map: config.map,
  name: () => ui.name.value.trim(),
  storage: (() => {
    try {
      return window.localStorage;
    } catch (err) {
      return null; // blocked: the device is shown while the page is open, not kept
    }
  })(),
});

// ---------------------------------------------------------------- new private map

const storedTtl = load('localStorage', TTL_KEY);
if ([...ui.ttl.options].some((o) => o.value === storedTtl)) ui.ttl.value = storedTtl;
ui.ttl.addEventListener('change', () => save('localStorage', TTL_KEY, ui.ttl.value));

function createMap() {
  ui.newMap.disabled = true;
  const ttl = ui.ttl.value;
  const query = ttl === 'never' ? '' : `?ttl=${encodeURIComponent(ttl)}`;
  fetch(`/api/maps${query}`, {method: 'POST', cache: 'no-store',
                               headers: {Accept: 'application/json'}})
    .then((response) => response.json().catch(() => null).then((body) => {
      if (response.ok && body && typeof body.path === 'string' && MAP_PATH.test(body.path)) {
        save('sessionStorage', CREATED_KEY,
             JSON.stringify({map: body.map, expires: body.expires}));
        location.assign(body.path);
        return;
      }
      const why = body && typeof body.message === 'string' && body.message
        ? body.message : `HTTP ${response.status}`;
      toast(`Could not create a map: ${why}`);
      ui.newMap.disabled = false;
    }))
    .catch((err) => {
      console.warn('livemap: creating a map', err);
      toast('Could not create a map: the server cannot be reached');
      ui.newMap.disabled = false;
    });
}
ui.newMap.addEventListener('click', createMap);

// Whoever made this map in this tab is told it is private and when it ends.
function showMapInfo() {
  let created = null;
  try {
    created = JSON.parse(load('sessionStorage', CREATED_KEY) || 'null');
  } catch (err) { /* ignore */ }
  if (!created || created.map !== config.map) return;
  const until = Number.isFinite(created.expires)
    ? `until ${new Date(created.expires).toLocaleString(undefined, {
      weekday: 'short', hour: '2-digit', minute: '2-digit'})}`
    : 'with no expiry';
  ui.mapInfo.textContent =
    `Private map, ${until}. Only people with its link can see it: copy the link to invite them.`;
  ui.mapInfo.hidden = false;
}

// ---------------------------------------------------------------- test hook

window.livemap = Object.freeze({
  state: () => ({
    id: myId,
    pins: [...pins.keys()],
    connected,
    transport: connected && link ? link.transport : null,
    sockjs: Boolean(connected && link && link.sockjs),
    zoom: map.getZoom(),
    closed: closedFor,
    retrying: retryTimer !== null,
    skew,
    following,
    notLive: notLiveSince !== null,
    peopleOpen: people.isOpen,
    trails: trails.visible,
    free: freeArea(),
    // Where "centre on" puts a pin: the middle of the free part of the map.
    middle: (() => {
      const a = fitArea();
      return {x: (a.left + a.right) / 2, y: (a.top + a.bottom) / 2};
    })(),
    centre: [map.getCenter().lat, map.getCenter().lng],
    total,
    big: bigMap,
    drawn: crowd.drawn.pins,
  }),
  // The clusters on the screen: [{id, count, x, y}] (container pixels).
  clusters: () => crowd.drawn.clusters.map((c) => ({...c})),
  pin: (id) => {
    const entry = pins.get(id);
    return entry ? {...entry.pin, stale: entry.stale} : null;
  },
  // The positions of pin `id` this page received in the trail's window.
  trail: (id) => trails.points(id),
});

setPanelOpen();
trails.setVisible(ui.trails.checked);
showCount();
showMapInfo();
startCompass();
startGeolocation();
setInterval(() => {
  refreshAges();
  keepAlive();
}, STALE_CHECK_MS);
// Every second: "N s ago" in the people list, "not live for N s", the
// trails' ten minutes.
setInterval(() => {
  if (notLiveSince !== null) refreshAges();
  trails.pruneAll();
  if (people.isOpen || following !== null) people.render();
}, TICK_MS);
document.addEventListener('visibilitychange', () => {
  refreshAges();
  keepAlive();
});
askServerTime();
connect();
