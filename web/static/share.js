// "Share from a phone app": a device for this map (docs/protocol.md, "Extension:
// phone apps"), and what to enter in each app to keep the pin moving in the
// background, with QR codes for the phone's camera and one-tap setup links.
//
// The device's token is its only credential: it is shown in the dialog and
// kept in localStorage (so this browser can show and delete it later), and
// never written to the console. The QR codes are drawn here, as SVG, by uqr
// (web/vendor/uqr/), loaded the first time the dialog opens.

const DEVICES_KEY = 'livemap.devices'; // localStorage: {map name: the device as the server made it}
const QR_MODULE = '/vendor/uqr/index.mjs';
const QR_MAX_PX = 280; // the largest a code is drawn (in CSS pixels)
const QR_BORDER = 4; // modules of white around a code (the quiet zone the standard asks for)
const COPIED_MS = 2000;

// What each app needs, in the order a person is most likely to want them.
// `values` are keys of the server's `apps.{app}`; `link` and `qr` say which
// of them is the one-tap setup link and which the QR code carries.
const APPS = [
  {
    key: 'owntracks',
    name: 'OwnTracks',
    hint: 'iPhone and Android \u00b7 one tap, once it allows external configuration',
    link: {value: 'config', label: 'Set up OwnTracks'},
    qr: {value: 'config', what: 'the OwnTracks setup link'},
    // Android 2.6.0 and iPhone 26.2.1 refuse a configuration from a link
    // until the user allows it.
    how: [
      'First, in OwnTracks: turn on \u201cAllow external configuration\u201d (it is off in recent versions, and the link does nothing until it is on).',
      'Then on this phone: tap \u201cSet up OwnTracks\u201d and let it import the configuration. On another screen: scan the code with the phone\u2019s camera.',
      'Or by hand, in Settings, Connection, in this order:',
    ],
    // In the order of the app's own Connection screen (Mode, URL, Identification).
    values: [
      {value: 'mode', label: 'Mode', copy: false},
      {value: 'url', label: 'URL'},
      {value: 'device_id', label: 'Device ID'},
      {value: 'tid', label: 'Tracker ID'},
    ],
    // iPhone's OwnTracks blocks plain http (and follows no redirect).
    httpNote: 'On iPhone, OwnTracks needs an https address and this one is http: it will not send from an iPhone. Use it on Android, or Traccar Client on iPhone.',
  },
  {
    key: 'traccar',
    name: 'Traccar Client',
    hint: 'iPhone and Android \u00b7 one scan sets it up',
    // The app's scanner takes the address and its `id`; its link does the same.
    link: {value: 'link', label: 'Set up Traccar Client', scheme: 'org.traccar.client'},
    qr: {value: 'qr', what: 'the Traccar Client setup address'},
    how: [
      'On this phone: tap \u201cSet up Traccar Client\u201d. On another screen: in the app\u2019s settings, scan the code: it sets the server URL and the device identifier.',
      'Or by hand, in its settings: the device identifier and the server URL. Then start tracking.',
    ],
    values: [
      {value: 'device_id', label: 'Device identifier'},
      {value: 'server_url', label: 'Server URL'},
    ],
  },
  {
    key: 'osmand',
    name: 'OsmAnd',
    hint: 'Android only \u00b7 the maps app',
    how: [
      'Android only: OsmAnd for iPhone has no online tracking (use OwnTracks or Traccar Client there).',
      'Plugins: turn on Trip recording. In its settings, Online tracking: paste this as the web address, and turn online tracking on.',
      'Then start trip recording too: OsmAnd sends nothing while it is off.',
    ],
    values: [{value: 'url', label: 'Web address'}],
  },
  {
    key: 'gpslogger',
    name: 'GPSLogger',
    hint: 'Android',
    how: [
      'Logging details, Log to custom URL: turn it on and paste this URL; HTTP method GET.',
    ],
    values: [
      {value: 'url', label: 'URL'},
      {value: 'method', label: 'HTTP method', copy: false},
    ],
  },
  {
    key: 'overland',
    name: 'Overland',
    hint: 'iPhone \u00b7 one tap sets it up',
    link: {value: 'config', label: 'Set up Overland'},
    qr: {value: 'config', what: 'the Overland setup link'},
    how: [
      'On this phone: tap \u201cSet up Overland\u201d. On another screen: scan the code.',
      'By hand: Settings, Receiver Endpoint and Access Token.',
    ],
    values: [
      {value: 'endpoint', label: 'Receiver endpoint'},
      {value: 'token', label: 'Access token'},
    ],
  },
];

const SVG = 'http://www.w3.org/2000/svg';

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'text') node.textContent = value;
    else if (key === 'className') node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function loadStored(storage) {
  try {
    const all = JSON.parse(storage.getItem(DEVICES_KEY) || '{}');
    return all && typeof all === 'object' ? all : {};
  } catch (err) {
    return {}; // storage blocked or unreadable: the device is only kept while the page is open
  }
}

function saveStored(storage, all) {
  try {
    if (Object.keys(all).length) storage.setItem(DEVICES_KEY, JSON.stringify(all));
    else storage.removeItem(DEVICES_KEY);
  } catch (err) { /* not kept; still shown */ }
}

/** A device as the server made it, with every value the dialog shows; else null. */
function validDevice(device) {
  if (!device || typeof device !== 'object' || typeof device.token !== 'string' ||
      typeof device.delete !== 'string' || !device.apps || typeof device.apps !== 'object') {
    return null;
  }
  for (const app of APPS) {
    const values = device.apps[app.key];
    if (!values || typeof values !== 'object') return null;
    const keys = [...app.values.map((v) => v.value), app.link && app.link.value,
                  app.qr && app.qr.value].filter(Boolean);
    if (!keys.every((k) => typeof values[k] === 'string')) return null;
  }
  return device;
}

/** Only a link the app itself opens (never javascript: or the like). */
function appLink(value, scheme) {
  return typeof value === 'string' && value.startsWith(`${scheme}:`) ? value : null;
}

/** "Device identifier" as it reads inside a sentence ("device identifier"); "URL" stays. */
function inSentence(label) {
  return /^[A-Z][a-z]/.test(label) ? label[0].toLowerCase() + label.slice(1) : label;
}

export class ShareDialog {
  /**
   * @param {object} elements {dialog, openers: the buttons that open it, status, retry, apps,
   *   remove, pinName}
   * @param {object} options {map: the map's name, name(): the name typed in the panel,
   *   storage: window.localStorage (or a stand-in)}
   */
  constructor(elements, {map, name, storage}) {
    this.el = elements;
    this.map = map;
    this.name = name;
    this.storage = storage;
    this.device = null; // the device shown, as the server made it
    this.busy = false;
    this.qr = null; // uqr's module, once loaded
    this.built = false;
    this.opener = null; // the button that opened the dialog: the focus goes back to it
    for (const opener of elements.openers) {
      opener.addEventListener('click', () => {
        this.opener = opener;
        this.open();
      });
    }
    elements.retry.addEventListener('click', () => this.create());
    elements.remove.addEventListener('click', () => this.remove());
    for (const button of elements.dialog.querySelectorAll('[data-close]')) {
      button.addEventListener('click', () => elements.dialog.close());
    }
    // A click on the backdrop (the dialog element itself, outside its content) closes it.
    elements.dialog.addEventListener('click', (e) => {
      if (e.target === elements.dialog) elements.dialog.close();
    });
    // Escape closes it too (the browser's own `cancel`); focus goes back to the opener.
    elements.dialog.addEventListener('close', () => {
      const opener = this.opener;
      if (opener && opener.isConnected && opener.getClientRects().length) opener.focus();
    });
  }

  open() {
    if (!this.built) this.build();
    if (!this.el.dialog.open) this.el.dialog.showModal();
    const stored = validDevice(loadStored(this.storage)[this.map]);
    if (this.device === null && stored) this.device = stored;
    if (this.device) this.show(this.device);
    else this.create();
  }

  /** The dialog's app sections (once): each value a read-only text with a Copy button. */
  build() {
    this.built = true;
    this.sections = new Map();
    for (const app of APPS) {
      const body = el('div', {className: 'app-body'});
      const parts = {values: new Map(), link: null, qr: null, note: null};
      body.append(el('ul', {className: 'app-how'}, app.how.map((line) => el('li', {text: line}))));
      if (app.httpNote) {
        parts.note = el('p', {className: 'app-note', 'data-note': 'http', text: app.httpNote});
        parts.note.hidden = true;
        body.append(parts.note);
      }
      if (app.link) {
        const link = el('a', {className: 'tool primary', href: '#', 'data-link': app.link.value,
                              text: app.link.label});
        const copy = this.copyButton(`Copy link to set up ${app.name}`, 'Copy link',
                                     () => link.getAttribute('href'));
        parts.link = link;
        body.append(el('div', {className: 'app-link'}, [link, copy]));
      }
      if (app.qr) {
        parts.qr = el('figure', {className: 'qr', 'data-qr': app.qr.value});
        body.append(parts.qr);
      }
      const list = el('dl', {className: 'values'});
      for (const spec of app.values) {
        const id = `share-${app.key}-${spec.value}`;
        const value = el('code', {className: 'value', id, 'data-value': spec.value});
        const row = el('div', {className: 'value-row'}, [
          el('dt', {text: spec.label}),
          el('dd', {}, [value]),
        ]);
        if (spec.copy !== false) {
          row.lastChild.append(this.copyButton(`Copy the ${app.name} ${inSentence(spec.label)}`,
                                               'Copy', () => value.textContent, value));
        }
        parts.values.set(spec.value, value);
        list.append(row);
      }
      body.append(list);
      const section = el('details', {className: 'app', name: 'share-app', 'data-app': app.key}, [
        el('summary', {}, [
          el('span', {className: 'app-name', text: app.name}),
          el('span', {className: 'app-hint', text: app.hint}),
        ]),
        body,
      ]);
      if (app === APPS[0]) section.open = true;
      this.sections.set(app.key, {section, ...parts});
      this.el.apps.append(section);
    }
  }

  /**
   * A button that copies `text()`: "Copied" for a moment; where the page may
   * not copy (plain http on a LAN address), the text `select` is selected
   * instead, for the system's own copy.
   */
  copyButton(label, shown, text, select) {
    // The name starts with the words shown (WCAG's "label in name").
    const button = el('button', {type: 'button', className: 'tool copy', 'aria-label': label,
                                 text: shown});
    let timer = null;
    button.addEventListener('click', () => {
      const done = () => {
        button.classList.add('copied');
        button.textContent = 'Copied';
        button.setAttribute('aria-label', `Copied: ${label.replace(/^Copy /, '')}`);
        clearTimeout(timer);
        timer = setTimeout(() => {
          button.classList.remove('copied');
          button.textContent = shown;
          button.setAttribute('aria-label', label);
        }, COPIED_MS);
      };
      const fallback = () => {
        if (select) {
          window.getSelection().selectAllChildren(select);
          this.say('This browser does not let the page copy: the text is selected, copy it from there.');
        } else {
          this.say('This browser does not let the page copy: touch and hold the link to copy it.');
        }
      };
      if (!navigator.clipboard || typeof navigator.clipboard.writeText !== 'function') {
        fallback();
        return;
      }
      navigator.clipboard.writeText(text()).then(done, fallback);
    });
    return button;
  }

  say(text, kind = 'info') {
    // Always in the page (empty when there is nothing to say), so that
    // screen readers announce what it comes to say.
    this.el.status.textContent = text;
    this.el.status.dataset.kind = kind;
  }

  setBusy(busy) {
    this.busy = busy;
    this.el.remove.disabled = busy;
    this.el.retry.disabled = busy;
  }

  /** Makes a device for this map with the name typed in the panel, and shows it. */
  create() {
    if (this.busy) return;
    this.setBusy(true);
    this.el.apps.hidden = true;
    this.el.remove.hidden = true;
    this.el.retry.hidden = true;
    this.el.pinName.textContent = '';
    this.say('Setting up a device for your phone\u2026');
    const name = this.name();
    fetch(`/api/maps/${encodeURIComponent(this.map)}/devices`, {
      method: 'POST',
      cache: 'no-store',
      headers: {'Content-Type': 'application/json', Accept: 'application/json'},
      body: JSON.stringify(name ? {name} : {}),
    }).then((response) => response.json().catch(() => null).then((body) => {
      this.setBusy(false);
      const device = response.status === 201 ? validDevice(body) : null;
      if (device) {
        const all = loadStored(this.storage);
        all[this.map] = device;
        saveStored(this.storage, all);
        this.device = device;
        this.show(device);
        return;
      }
      const why = body && typeof body.error === 'string' && body.error
        ? body.error : `the server answered ${response.status}`;
      this.failed(`Could not set up a device: ${why}.`);
    })).catch(() => {
      this.setBusy(false);
      this.failed('Could not set up a device: the server cannot be reached.');
    });
  }

  failed(text) {
    this.say(text, 'error');
    this.el.retry.textContent = 'Try again';
    this.el.retry.hidden = false;
  }

  show(device) {
    this.say('');
    this.el.retry.hidden = true;
    this.el.remove.hidden = false;
    this.el.pinName.textContent = device.name
      ? `Its pin is called \u201c${device.name}\u201d.`
      : 'Its pin has no name: type yours in the name field, then set up a new device.';
    for (const app of APPS) {
      const values = device.apps[app.key];
      const parts = this.sections.get(app.key);
      for (const [key, node] of parts.values) node.textContent = values[key];
      if (parts.note) parts.note.hidden = !/^http:/.test(values.url);
      if (parts.link) {
        const href = appLink(values[app.link.value], app.link.scheme || app.key);
        parts.link.href = href || '#';
        parts.link.hidden = href === null;
      }
    }
    this.el.apps.hidden = false;
    this.drawCodes(device);
  }

  drawCodes(device) {
    const draw = () => {
      if (this.device !== device) return;
      for (const app of APPS) {
        if (!app.qr) continue;
        const figure = this.sections.get(app.key).qr;
        figure.replaceChildren(this.qrCode(device.apps[app.key][app.qr.value], app.qr.what));
      }
    };
    if (this.qr) {
      draw();
      return;
    }
    import(QR_MODULE).then((module) => {
      this.qr = module;
      draw();
    }).catch((err) => {
      console.warn('livemap: the QR code library did not load', err.message);
      for (const app of APPS) {
        if (app.qr) this.sections.get(app.key).qr.textContent = 'The QR code could not be drawn.';
      }
    });
  }

  /** An SVG of the QR code of `text`: one square per dark module, on white. */
  qrCode(text, what) {
    const code = this.qr.encode(text, {ecc: 'M', border: QR_BORDER});
    const size = code.size;
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('viewBox', `0 0 ${size} ${size}`);
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', `QR code of ${what}`);
    svg.setAttribute('shape-rendering', 'crispEdges');
    // Whole CSS pixels per module, so that every module is as wide as the next.
    const scale = Math.max(2, Math.floor(QR_MAX_PX / size));
    svg.style.width = `${size * scale}px`; // at most: narrower where the screen is (style.css)
    const background = document.createElementNS(SVG, 'rect');
    background.setAttribute('width', size);
    background.setAttribute('height', size);
    background.setAttribute('fill', '#fff');
    const path = document.createElementNS(SVG, 'path');
    let d = '';
    code.data.forEach((row, y) => row.forEach((dark, x) => {
      if (dark) d += `M${x} ${y}h1v1h-1z`;
    }));
    path.setAttribute('d', d);
    path.setAttribute('fill', '#000');
    svg.append(background, path);
    return svg;
  }

  /** The map expired or never was: so is its device (the server deleted it with the map). */
  mapGone() {
    const all = loadStored(this.storage);
    if (this.map in all) {
      delete all[this.map];
      saveStored(this.storage, all);
    }
    this.device = null;
    if (this.el.dialog.open) this.el.dialog.close();
  }

  /** Deletes the device: the apps' reports are refused from then on and its pin leaves the map. */
  remove() {
    const device = this.device;
    if (!device || this.busy) return;
    this.setBusy(true);
    this.say('Deleting the device\u2026');
    // The path only: the page's own origin, whatever host the server named.
    const path = new URL(device.delete, location.href).pathname;
    fetch(path, {method: 'DELETE', cache: 'no-store'}).then((response) => {
      this.setBusy(false);
      // 404: it was deleted already (in another tab, say): gone all the same.
      if (response.status === 204 || response.status === 404) {
        this.forget(device);
        return;
      }
      return response.json().catch(() => null).then((body) => {
        const why = body && typeof body.error === 'string' ? body.error : `the server answered ${response.status}`;
        this.say(`Could not delete the device: ${why}.`, 'error');
      });
    }).catch(() => {
      this.setBusy(false);
      this.say('Could not delete the device: the server cannot be reached.', 'error');
    });
  }

  forget(device) {
    const all = loadStored(this.storage);
    if (all[this.map] && all[this.map].token === device.token) delete all[this.map];
    saveStored(this.storage, all);
    this.device = null;
    this.el.apps.hidden = true;
    this.el.remove.hidden = true;
    this.el.pinName.textContent = '';
    for (const {qr} of this.sections.values()) if (qr) qr.replaceChildren();
    for (const {values} of this.sections.values()) for (const node of values.values()) node.textContent = '';
    this.say('Deleted. The app can no longer move your pin, and the pin has left the map.', 'done');
    this.el.retry.textContent = 'Set up a new device';
    this.el.retry.hidden = false;
    this.el.status.focus();
  }
}
