// The crowd: how a big map is drawn (docs/architecture.md, "The page").
// Past a few dozen people, pins are painted on one canvas instead of one
// DOM element each; zoomed out, a cell of the map holding more than K pins
// is one round mark with a count (the server's clusters when it sends them,
// the same cells counted here when it does not); and names are DOM labels,
// only as many as fit without overlapping. The viewer's own pin and the
// person followed stay DOM markers of app.js, above all of this.

/* global L */

// The server's grid (docs/protocol.md, "Extension: clusters"): at zoom Z,
// the Web Mercator tiles of level Z + 1, 128 px on the screen; a cell with
// more than K pins is a cluster; from zoom 18 up nothing is.
const CELL_PX = 128;
const CLUSTER_OVER = 4;
const CLUSTER_BELOW_ZOOM = 18;
const MAX_LEVEL = 23;
const MAX_LABELS = 60; // names on the screen at once: more could not be read
const LABEL_TRIES = 800; // candidates tried per frame, nearest first
const LABEL_H = 20;
const LABEL_PAD_X = 7;
const LABEL_MAX_W = 160;
const LABEL_GAP_Y = 18; // from a pin's centre to the top of its label
const EDGE = 2; // labels keep this far from the screen's edges
const LABEL_BELOW_PX = 18; // from a DOM pin's centre to its name (style.css: .pin-label)
const MAX_DPR = 2; // sharper is not seen on a moving map and costs four times the pixels

/** The box {left, top, right, bottom} of a label or a mark, in container pixels. */
function overlaps(a, b) {
  return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
}

/**
 * Names of app.js's DOM pins (every pin of a small map; the viewer and the
 * person followed on a big one): each is shown only where it covers no
 * cluster mark (`marks`: their boxes) and, but the viewer's own, no name
 * placed before it (the viewer first, then `rank` 1, then the nearest to
 * `focus`), slid sideways to stay on the screen. Below its pin, or above
 * it at the bottom of the screen or when a mark is below. Returns the
 * boxes taken, in container pixels.
 * @param {L.Map} map
 * @param {Array} entries app.js's entries with a `dom`
 * @param {L.LatLng|null} focus
 * @param {(entry) => number} rank 0 for the viewer's own pin
 * @param {Array<{left, top, right, bottom}>} marks
 */
export function placeDomLabels(map, entries, focus, rank, marks) {
  const size = map.getSize();
  const from = focus ? map.latLngToContainerPoint(focus) : L.point(size.x / 2, size.y / 2);
  const placed = entries.map((e) => ({e, p: map.latLngToContainerPoint(e.at)}));
  placed.sort((a, b) => (rank(a.e) - rank(b.e)) || (a.p.distanceTo(from) - b.p.distanceTo(from)));
  // Reads first (sizes of changed names), then writes: one layout at most.
  for (const {e} of placed) {
    if (!e.labelSize || e.labelSize.w === 0) {
      const label = e.dom.label;
      e.labelSize = {w: label.offsetWidth, h: label.offsetHeight};
    }
  }
  const taken = [];
  for (const {e, p} of placed) {
    const {w, h} = e.labelSize;
    let dx = 0;
    const left = p.x - w / 2;
    if (left < EDGE) dx = EDGE - left;
    else if (left + w > size.x - EDGE) dx = size.x - EDGE - (left + w);
    dx = Math.round(dx);
    const above = -(2 * LABEL_BELOW_PX + h);
    // Below the pin, or above it at the bottom of the screen; the other
    // side if a mark is in the way.
    const sides = p.y + LABEL_BELOW_PX + h > size.y - EDGE ? [above] : [0, above];
    const boxAt = (dy) => {
      const top = p.y + LABEL_BELOW_PX + dy;
      return {left: left + dx, top, right: left + dx + w, bottom: top + h};
    };
    const dy = sides.find((side) => !marks.some((m) => overlaps(m, boxAt(side)))) ?? sides[0];
    const box = boxAt(dy);
    const offScreen = p.x < 0 || p.y < 0 || p.x > size.x || p.y > size.y ||
      box.top < EDGE - 1 || box.bottom > size.y - EDGE + 1;
    const hidden = w > 0 && (offScreen || marks.some((m) => overlaps(m, box)) ||
      (rank(e) > 0 && taken.some((t) => overlaps(t, box))));
    if (!hidden) taken.push(box);
    if (dx !== e.labelDx || dy !== e.labelDy) {
      e.labelDx = dx;
      e.labelDy = dy;
      e.dom.label.style.setProperty('--label-dx', `${dx}px`);
      e.dom.label.style.setProperty('--label-dy', `${dy}px`);
    }
    if (hidden !== e.labelHidden) {
      e.labelHidden = hidden;
      e.dom.label.classList.toggle('crowded', hidden);
    }
  }
  return taken;
}

export class Crowd {
  /**
   * @param {L.Map} map
   * @param {{onClusterTap: (bounds: L.LatLngBounds) => void, label: (entry) => string,
   *   named: (entry) => boolean}} options label and named: a pin's name, and whether it
   *   has one (rather than a stand-in such as "anonymous")
   */
  constructor(map, {onClusterTap, label, named}) {
    this.map = map;
    this.labelOf = label;
    this.namedOf = named;
    this.on = false;
    this.onClusterTap = onClusterTap;
    for (const [name, z] of [['crowdPins', 450], ['crowdMarks', 560], ['crowdLabels', 570]]) {
      const pane = map.createPane(name);
      pane.style.zIndex = String(z);
      pane.style.pointerEvents = 'none';
    }
    map.getPane('crowdMarks').classList.add('leaflet-zoom-hide');
    map.getPane('crowdLabels').classList.add('leaflet-zoom-hide');
    this.canvas = L.DomUtil.create('canvas', 'crowd-canvas leaflet-zoom-animated',
                                   map.getPane('crowdPins'));
    this.ctx = this.canvas.getContext('2d');
    this.marks = new Map(); // cluster id -> {el, count, x, y, bounds}
    this.labels = new Map(); // pin id -> {el, text, x, y, w}
    this.widths = new Map(); // label text -> width in px
    this.drawnAt = null; // {nw: L.LatLng, zoom}: where the canvas was last drawn
    this.drawn = {pins: 0, clusters: [], labels: 0};
    this.colours = null;
    map.getPane('crowdMarks').addEventListener('click', (e) => {
      const el = e.target.closest('[data-cluster-id]');
      const mark = el && this.marks.get(el.dataset.clusterId);
      if (!mark) return;
      L.DomEvent.stopPropagation(e); // not a tap on the map (which may place the viewer)
      this.onClusterTap(mark.bounds);
    });
    map.on('zoomanim', (e) => this.animateZoom(e));
    const scheme = window.matchMedia('(prefers-color-scheme: dark)');
    scheme.addEventListener('change', () => { this.colours = null; });
  }

  setOn(on) {
    if (on === this.on) return;
    this.on = on;
    this.canvas.hidden = !on;
    if (!on) {
      for (const mark of this.marks.values()) mark.el.remove();
      for (const label of this.labels.values()) label.el.remove();
      this.marks.clear();
      this.labels.clear();
      this.drawn = {pins: 0, clusters: [], labels: 0};
    }
  }

  /** The page's colours, from its CSS (light or dark). */
  palette() {
    if (!this.colours) {
      const css = getComputedStyle(document.documentElement);
      const read = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
      this.colours = {
        other: read('--other', '#e8590c'),
        stroke: read('--pin-stroke', '#fff'),
        font: `600 12.5px ${getComputedStyle(document.body).fontFamily || 'sans-serif'}`,
      };
    }
    return this.colours;
  }

  textWidth(text) {
    let w = this.widths.get(text);
    if (w === undefined) {
      if (this.widths.size > 5000) this.widths.clear();
      this.ctx.save();
      this.ctx.font = this.palette().font;
      w = Math.min(LABEL_MAX_W, Math.ceil(this.ctx.measureText(text).width) + 2 * LABEL_PAD_X + 2);
      this.ctx.restore();
      this.widths.set(text, w);
    }
    return w;
  }

  // Leaflet scales the map's panes during a zoom: the canvas follows, as
  // Leaflet's own renderers do, until it is drawn again at the new zoom.
  animateZoom(e) {
    if (!this.on || !this.drawnAt) return;
    const scale = this.map.getZoomScale(e.zoom, this.drawnAt.zoom);
    const offset = this.map._latLngToNewLayerPoint(this.drawnAt.nw, e.zoom, e.center);
    L.DomUtil.setTransform(this.canvas, offset, scale);
  }

  /**
   * Draws one frame.
   * @param {object} frame
   *   pins: app.js's entries [{pin, at, mx, my, heading, stale}] (mx, my: zoom-0 world
   *     pixels), the viewer's own pin and the person followed left out (app.js draws them);
   *   clusters: the server's clusters [{id, lat, lng, count, bbox}], or null to count here;
   *   focus: the container point names are placed nearest to first;
   *   reserved: (marks) => boxes: places the DOM pins' names away from the marks' boxes
   *     (container pixels) and returns the boxes they take;
   *   area: the part of the screen no panel covers (names elsewhere could not be read);
   *   dimAll: the connection is down (every pin as the past).
   */
  render({pins, clusters, focus, reserved, area, dimAll}) {
    if (!this.on) return;
    const map = this.map;
    const zoom = map.getZoom();
    const size = map.getSize();
    const scale = 2 ** zoom; // zoom-0 world pixels to this zoom
    const origin = map.getPixelOrigin();
    const pane = L.DomUtil.getPosition(map.getPane('mapPane'));
    // container point = world pixel - pixel origin + map pane position
    const ox = pane.x - origin.x;
    const oy = pane.y - origin.y;
    const margin = 40;
    const onScreen = (x, y) =>
      x > -margin && y > -margin && x < size.x + margin && y < size.y + margin;

    // Cells: the server's clusters, or the same cells counted here.
    let singles = pins;
    let marks = [];
    if (clusters) {
      marks = clusters.map((c) => ({id: c.id, lat: c.lat, lng: c.lng, count: c.count,
                                    bbox: c.bbox}));
    } else if (Math.round(zoom) < CLUSTER_BELOW_ZOOM) {
      const level = Math.min(Math.round(zoom) + 1, MAX_LEVEL);
      const cells = new Map();
      for (const p of pins) {
        const key = `${Math.floor(p.mx * scale / CELL_PX)}/${Math.floor(p.my * scale / CELL_PX)}`;
        const cell = cells.get(key);
        if (cell) cell.push(p);
        else cells.set(key, [p]);
      }
      singles = [];
      for (const [key, members] of cells) {
        if (members.length <= CLUSTER_OVER) {
          for (const p of members) singles.push(p);
          continue;
        }
        let lat = 0; let lng = 0;
        let w = Infinity; let s = Infinity; let e = -Infinity; let n = -Infinity;
        for (const p of members) {
          const at = p.at;
          lat += at.lat; lng += at.lng;
          w = Math.min(w, at.lng); e = Math.max(e, at.lng);
          s = Math.min(s, at.lat); n = Math.max(n, at.lat);
        }
        marks.push({id: `c:${level}/${key}`, lat: lat / members.length, lng: lng / members.length,
                    count: members.length, bbox: [w, s, e, n]});
      }
    }

    this.drawPins(singles, {scale, ox, oy, size, onScreen, dimAll});

    // Clusters, as DOM marks (a tap or a key zooms in), then the DOM pins'
    // names and the names that fit, none over a mark.
    const markBoxes = [];
    const keepMarks = new Set();
    const shownMarks = [];
    for (const m of marks) {
      const p = map.latLngToContainerPoint([m.lat, m.lng]);
      if (!onScreen(p.x, p.y)) continue;
      // At least 44 px across: a touch target a finger can hit (the page's rule).
      const r = m.count >= 1000 ? 28 : m.count >= 100 ? 25 : 22;
      keepMarks.add(m.id);
      markBoxes.push({left: p.x - r, top: p.y - r, right: p.x + r, bottom: p.y + r});
      shownMarks.push({id: m.id, count: m.count, x: p.x, y: p.y});
      this.placeMark(m, p, r);
    }
    for (const [id, mark] of this.marks) {
      if (!keepMarks.has(id)) {
        // A mark a key zoomed in from goes: the keyboard stays on the map.
        if (mark.el === document.activeElement) map.getContainer().focus({preventScroll: true});
        mark.el.remove();
        this.marks.delete(id);
      }
    }
    const taken = [...reserved(markBoxes), ...markBoxes];

    const candidates = [];
    for (const p of singles) {
      const x = p.mx * scale + ox;
      const y = p.my * scale + oy;
      if (x < area.left || y < area.top || x > area.right || y > area.bottom) continue;
      candidates.push({p, x, y, d: (x - focus.x) ** 2 + (y - focus.y) ** 2});
    }
    candidates.sort((a, b) => a.d - b.d);
    const keepLabels = new Set();
    let tries = 0;
    for (const c of candidates) {
      if (keepLabels.size >= MAX_LABELS || ++tries > LABEL_TRIES) break;
      const text = this.labelOf(c.p);
      const w = this.textWidth(text);
      const left = Math.round(Math.max(area.left + EDGE,
                                        Math.min(area.right - EDGE - w, c.x - w / 2)));
      let box = null;
      for (const top of [Math.round(c.y + LABEL_GAP_Y), Math.round(c.y - LABEL_GAP_Y - LABEL_H)]) {
        const b = {left, top, right: left + w, bottom: top + LABEL_H};
        if (b.top < area.top + EDGE || b.bottom > area.bottom - EDGE) continue;
        if (!taken.some((t) => overlaps(t, b))) {
          box = b;
          break;
        }
      }
      if (!box) continue;
      taken.push(box);
      keepLabels.add(c.p.pin.id);
      this.placeLabel(c.p.pin.id, text, this.namedOf(c.p), box, w, pane);
    }
    for (const [id, label] of this.labels) {
      if (!keepLabels.has(id)) {
        label.el.remove();
        this.labels.delete(id);
      }
    }
    this.drawn = {pins: this.drawn.pins, clusters: shownMarks, labels: keepLabels.size};
  }

  drawPins(pins, {scale, ox, oy, size, onScreen, dimAll}) {
    const map = this.map;
    const dpr = Math.min(MAX_DPR, window.devicePixelRatio || 1);
    const canvas = this.canvas;
    const width = Math.round(size.x * dpr);
    const height = Math.round(size.y * dpr);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
      canvas.style.width = `${size.x}px`;
      canvas.style.height = `${size.y}px`;
    }
    // The canvas covers the container exactly, wherever the map's pane is.
    const topLeft = map.containerPointToLayerPoint([0, 0]);
    L.DomUtil.setTransform(canvas, topLeft, 1);
    this.drawnAt = {nw: map.containerPointToLatLng([0, 0]), zoom: map.getZoom()};
    const ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, size.x, size.y);
    const colours = this.palette();
    ctx.fillStyle = colours.other;
    ctx.strokeStyle = colours.stroke;
    ctx.lineWidth = 2.5;
    ctx.lineJoin = 'round';
    let drawn = 0;
    // Dim ones (stale) first, so that the live ones are drawn over them;
    // while the connection is down, every pin is dim.
    const passes = dimAll ? [[0.5, () => true]] : [[0.45, (p) => p.stale], [1, (p) => !p.stale]];
    for (const [alpha, wanted] of passes) {
      ctx.globalAlpha = alpha;
      for (const p of pins) {
        if (!wanted(p)) continue;
        const x = p.mx * scale + ox;
        const y = p.my * scale + oy;
        if (!onScreen(x, y)) continue;
        drawn++;
        ctx.beginPath();
        if (p.heading === null) {
          ctx.arc(x, y, 8, 0, 2 * Math.PI);
        } else {
          // The same arrow as the DOM pin's (index.html, .pin-arrow).
          const a = p.heading * Math.PI / 180;
          const cos = Math.cos(a); const sin = Math.sin(a);
          const pt = (px, py) => [x + px * cos - py * sin, y + px * sin + py * cos];
          ctx.moveTo(...pt(0, -13));
          ctx.lineTo(...pt(10, 11));
          ctx.lineTo(...pt(0, 5));
          ctx.lineTo(...pt(-10, 11));
          ctx.closePath();
        }
        ctx.stroke();
        ctx.fill();
      }
    }
    ctx.globalAlpha = 1;
    this.drawn.pins = drawn;
  }

  placeMark(m, p, r) {
    let mark = this.marks.get(m.id);
    if (!mark) {
      // A button: Tab reaches it, Enter or Space zooms in as a tap does.
      const el = L.DomUtil.create('button', 'cluster', this.map.getPane('crowdMarks'));
      el.type = 'button';
      el.dataset.clusterId = m.id;
      mark = {el, count: null, x: null, y: null, r: null, bounds: null};
      this.marks.set(m.id, mark);
    }
    const [w, s, e, n] = Array.isArray(m.bbox) && m.bbox.length === 4 ? m.bbox
      : [m.lng, m.lat, m.lng, m.lat];
    mark.bounds = L.latLngBounds([s, w], [n, e]);
    if (mark.count !== m.count) {
      mark.count = m.count;
      const count = m.count.toLocaleString('en-US');
      mark.el.textContent = count;
      mark.el.title = `${count} people here, zoom in`;
      mark.el.setAttribute('aria-label', mark.el.title);
    }
    if (mark.r !== r) {
      mark.r = r;
      mark.el.style.width = mark.el.style.height = `${2 * r}px`;
      mark.el.style.lineHeight = `${2 * r - 6}px`; // inside its 3 px border
    }
    const at = this.map.containerPointToLayerPoint(p);
    const x = Math.round(at.x - r);
    const y = Math.round(at.y - r);
    if (mark.x !== x || mark.y !== y) {
      mark.x = x;
      mark.y = y;
      mark.el.style.transform = `translate3d(${x}px, ${y}px, 0)`;
    }
  }

  placeLabel(id, text, named, box, w, pane) {
    let label = this.labels.get(id);
    if (!label) {
      const el = L.DomUtil.create('div', 'crowd-label', this.map.getPane('crowdLabels'));
      el.dataset.labelFor = id;
      label = {el, text: null, named: null, x: null, y: null, w: null};
      this.labels.set(id, label);
    }
    if (label.text !== text) {
      label.text = text;
      label.el.textContent = text; // textContent, never innerHTML: names come from other people
    }
    if (label.named !== named) {
      label.named = named;
      label.el.classList.toggle('unnamed', !named);
    }
    if (label.w !== w) {
      label.w = w;
      label.el.style.width = `${w}px`;
    }
    // Layer pixels: the label moves with the map's pane while it is dragged.
    const x = Math.round(box.left - pane.x);
    const y = Math.round(box.top - pane.y);
    if (label.x !== x || label.y !== y) {
      label.x = x;
      label.y = y;
      label.el.style.transform = `translate3d(${x}px, ${y}px, 0)`;
    }
  }
}
