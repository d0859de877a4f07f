// livemap map page: one pin per person, live over WebSocket or SockJS.
//
// Plain ES2020 module, no build step. Leaflet is the global `L` (loaded by a
// deferred classic script before this module runs); SockJS is loaded only when
// the plain WebSocket cannot be used. The wire protocol is docs/PROTOCOL.md
// (shared/PROTOCOL.md): welcome/update/snapshot/error in, hello/move out.

/* global L */

const NAME_KEY = 'livemap.name';
const FIRST_FIX_ZOOM = 15;
const HEADING_STEP = 5; // degrees: smaller heading-only changes are not sent
const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const WELCOME_TIMEOUT_MS = 8000; // a WebSocket that says nothing this long is as good as blocked
const TOAST_MS = 4000;
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
  };
}

const config = readConfig();
// Sent no faster than `rate` a second; the small margin keeps network jitter
// from bunching two sends into one of the server's rate windows.
const MOVE_INTERVAL_MS = 1000 / config.rate + 10;

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
};

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

// ---------------------------------------------------------------- pins

/** @type {Map<string, {marker: L.Marker, arrow: Element, body: Element, label: Element, pin: object}>} */
const pins = new Map();
let myId = null;

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

function renderPin(entry, pin) {
  const mine = pin.id === myId;
  // Our own arrow follows the compass at once rather than waiting for the echo.
  const heading = mine && sensorHeading !== null ? sensorHeading : normHeading(pin.heading);
  entry.body.classList.toggle('has-heading', heading !== null);
  if (heading !== null) entry.arrow.style.transform = `rotate(${heading}deg)`;
  const name = typeof pin.name === 'string' && pin.name.trim() ? pin.name : '';
  // textContent, never innerHTML: names come from other people.
  entry.label.textContent = name || (mine ? 'you' : 'anonymous');
  entry.label.classList.toggle('unnamed', !name);
  const at = entry.marker.getLatLng();
  if (at.lat !== pin.lat || at.lng !== pin.lng) entry.marker.setLatLng([pin.lat, pin.lng]);
  entry.marker.setZIndexOffset(mine ? 1000 : 0);
  entry.pin = pin;
}

function upsertPin(pin) {
  if (!pin || typeof pin.id !== 'string' || !Number.isFinite(pin.lat) || !Number.isFinite(pin.lng)) {
    console.warn('livemap: ignoring malformed pin', pin);
    return;
  }
  let entry = pins.get(pin.id);
  if (!entry) {
    const content = ui.pinTemplate.content.firstElementChild.cloneNode(true);
    const mine = pin.id === myId;
    const marker = L.marker([pin.lat, pin.lng], {
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
    entry = {
      marker,
      body: content.querySelector('.pin-body'),
      arrow: content.querySelector('.pin-arrow'),
      label: content.querySelector('.pin-label'),
      pin,
    };
    pins.set(pin.id, entry);
  }
  renderPin(entry, pin);
}

function removePin(id) {
  const entry = pins.get(id);
  if (entry) {
    entry.marker.remove();
    pins.delete(id);
  }
}

function replacePins(list) {
  const keep = new Set((list || []).map((p) => p && p.id));
  for (const id of [...pins.keys()]) if (!keep.has(id)) removePin(id);
  for (const pin of list || []) upsertPin(pin);
  showCount();
}

function clearPins() {
  for (const id of [...pins.keys()]) removePin(id);
  showCount();
}

function showCount() {
  const n = pins.size;
  ui.count.textContent = `${n} ${n === 1 ? 'person' : 'people'}`;
}

// Until the viewer or a first fix picks a view, a welcome shows where people are.
let viewChosen = false;
map.on('dragstart', () => { viewChosen = true; });

function fitAll() {
  viewChosen = true;
  const points = [...pins.values()].map((e) => e.marker.getLatLng());
  if (points.length === 0) {
    toast('Nobody is on the map yet');
  } else if (points.length === 1) {
    map.setView(points[0], Math.max(map.getZoom(), FIRST_FIX_ZOOM));
  } else {
    const top = ui.name.closest('.panel').getBoundingClientRect().bottom;
    map.fitBounds(L.latLngBounds(points), {
      paddingTopLeft: [48, Math.max(48, top + 32)],
      paddingBottomRight: [72, 48],
      maxZoom: 17,
    });
  }
}
ui.fitAll.addEventListener('click', fitAll);

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

function currentHeading() {
  return sensorHeading !== null ? sensorHeading : gpsHeading;
}

function moveChanged() {
  if (!position) return false;
  if (!lastSent) return true;
  if (position.lat !== lastSent.lat || position.lng !== lastSent.lng ||
      position.accuracy !== lastSent.accuracy) return true;
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
  const move = {
    type: 'move',
    lat: position.lat,
    lng: position.lng,
    heading: currentHeading(),
    accuracy: position.accuracy,
    seq: seq++,
  };
  if (send(move)) {
    lastSent = move;
    lastSentAt = performance.now();
  }
}

function setPosition(lat, lng, accuracy) {
  position = {
    lat: Math.max(-90, Math.min(90, lat)),
    lng: Math.max(-180, Math.min(180, lng)),
    accuracy: typeof accuracy === 'number' && Number.isFinite(accuracy) && accuracy >= 0
      ? Math.round(accuracy * 10) / 10 : null,
  };
  requestSend();
}

// ---------------------------------------------------------------- geolocation

function onFix(pos) {
  const c = pos.coords;
  placeByClick = false;
  document.body.classList.remove('place-by-click');
  notice('');
  gpsHeading = normHeading(c.heading);
  setPosition(c.latitude, c.longitude, c.accuracy);
  if (!hadFix) {
    hadFix = true;
    viewChosen = true;
    map.setView([c.latitude, c.longitude], FIRST_FIX_ZOOM);
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
  const why = err.code === 1 ? 'denied' : err.code === 3 ? 'timeout' : 'unavailable';
  letUserPlace(why);
}

map.on('click', (e) => {
  if (!placeByClick) return;
  const at = e.latlng.wrap();
  setPosition(at.lat, at.lng, null);
  notice('');
});

function startGeolocation() {
  if (!('geolocation' in navigator)) {
    letUserPlace('unsupported');
    return;
  }
  navigator.geolocation.watchPosition(onFix, onGeoError, {
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

// ---------------------------------------------------------------- name

function storedName() {
  try {
    return localStorage.getItem(NAME_KEY) || '';
  } catch (err) {
    return ''; // storage blocked (private mode): the name just isn't kept
  }
}

let lastSentName = null;
let nameTimer = null;

function sendName() {
  clearTimeout(nameTimer);
  const name = ui.name.value.trim();
  try {
    localStorage.setItem(NAME_KEY, name);
  } catch (err) { /* not kept; still sent */ }
  if (!connected || !name || name === lastSentName) return;
  if (send({type: 'hello', name})) lastSentName = name;
}

ui.name.value = storedName();
ui.name.addEventListener('input', () => {
  clearTimeout(nameTimer);
  nameTimer = setTimeout(sendName, 600);
});
ui.name.addEventListener('change', sendName);
ui.name.addEventListener('keydown', (e) => {
  if (e.key === 'Enter') ui.name.blur();
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
      for (const id of msg.gone || []) removePin(id);
      for (const pin of msg.pins || []) upsertPin(pin);
      showCount();
      break;
    case 'snapshot':
      if (connected) replacePins(msg.pins);
      break;
    case 'error':
      console.warn('livemap: server says', msg.code, msg.message);
      toast(msg.message ? `Server: ${msg.message}` : `Server error: ${msg.code}`);
      break;
    default:
      console.warn('livemap: unknown message type', msg.type);
  }
}

function onWelcome(msg) {
  myId = typeof msg.id === 'string' ? msg.id : String(msg.id);
  connected = true;
  failures = 0;
  if (link.sockjs) useSockjs = true; // it worked: stay on it for this page's life
  setStatus('connected', `connected \u00b7 ${transportLabel(link)}`);
  clearPins(); // the own pin's look may change with the new id
  replacePins(msg.pins);
  if (!viewChosen && pins.size > 0) fitAll();
  // A new connection knows nothing of us: say who and where we are again.
  lastSentName = null;
  lastSent = null;
  sendName();
  requestSend();
}

function linkDown(myAttempt, l, hadWelcome) {
  if (myAttempt !== attempt) return;
  attempt++; // ignore anything further from this link
  link = null;
  connected = false;
  clearTimeout(sendTimer);
  sendTimer = null;
  clearPins();
  // WebSocket never got as far as a welcome: quietly try SockJS at once.
  if (!l.sockjs && !hadWelcome && forced === null) {
    openSockjs();
    return;
  }
  scheduleReconnect();
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
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  retryTimer = null;
  if (useSockjs) openSockjs();
  else openWebSocket();
}

function openWebSocket() {
  const myAttempt = ++attempt;
  setStatus('connecting', 'connecting\u2026');
  const url = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}${config.wsPath}`;
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
    linkDown(myAttempt, l, welcomed);
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
      linkDown(myAttempt, l, welcomed);
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

// ---------------------------------------------------------------- test hook

window.livemap = Object.freeze({
  state: () => ({
    id: myId,
    pins: [...pins.keys()],
    connected,
    transport: connected && link ? link.transport : null,
    sockjs: Boolean(connected && link && link.sockjs),
    zoom: map.getZoom(),
  }),
  pin: (id) => {
    const entry = pins.get(id);
    return entry ? {...entry.pin} : null;
  },
});

showCount();
startCompass();
startGeolocation();
connect();
