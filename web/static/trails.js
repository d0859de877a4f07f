// Short trails: where each pin went over the last minutes, kept by this page
// only, from the updates it received itself. The server keeps no history and
// nothing here asks for one: a page that opens later has shorter trails.

/* global L */

const MIN_STEP_M = 3; // closer fixes add nothing a person could see
const MAX_POINTS = 600; // per pin: a fix a second for the whole window

export class Trails {
  /**
   * @param {L.Map} map
   * @param {{windowMs: number, now: () => number}} options now() is the server's clock
   */
  constructor(map, {windowMs, now}) {
    this.map = map;
    this.windowMs = windowMs;
    this.now = now;
    this.layer = L.layerGroup();
    this.visible = false;
    /** @type {Map<string, {id: string, points: {lat: number, lng: number, ts: number}[], mine: boolean, line: L.Polyline|null}>} */
    this.byId = new Map();
  }

  /** A position the page received for pin `id` (its `ts` is the server's time of the fix). */
  record(id, lat, lng, ts, mine) {
    let trail = this.byId.get(id);
    if (!trail) {
      trail = {id, points: [], mine, line: null};
      this.byId.set(id, trail);
    }
    trail.mine = mine;
    const at = Number.isFinite(ts) ? ts : this.now();
    const last = trail.points[trail.points.length - 1];
    if (last && at < last.ts) return; // never draw back in time
    if (last && this.map.distance([last.lat, last.lng], [lat, lng]) < MIN_STEP_M) {
      last.ts = at; // still there: the trail's end is now
      return;
    }
    trail.points.push({lat, lng, ts: at});
    if (trail.points.length > MAX_POINTS) trail.points.shift();
    this.prune(trail);
    this.draw(trail);
  }

  /** The pin left: its trail goes with it. */
  remove(id) {
    const trail = this.byId.get(id);
    if (!trail) return;
    if (trail.line) this.layer.removeLayer(trail.line);
    this.byId.delete(id);
  }

  /** After a reconnect: keep the trails of the pins that are still there. */
  keepOnly(ids) {
    for (const id of [...this.byId.keys()]) if (!ids.has(id)) this.remove(id);
  }

  /** Our own pin has a new id on every connection: its trail carries on. */
  rename(from, to) {
    const trail = this.byId.get(from);
    if (!trail || from === to) return;
    this.remove(to);
    this.byId.delete(from);
    this.byId.set(to, trail);
    trail.id = to;
    const path = trail.line && trail.line.getElement();
    if (path) path.dataset.trailId = to;
  }

  setVisible(on) {
    this.visible = on;
    if (on) {
      this.layer.addTo(this.map); // first: a line's path exists once it is on the map
      for (const trail of this.byId.values()) {
        this.prune(trail);
        this.draw(trail);
      }
    } else {
      this.layer.remove();
    }
  }

  /** Drops what is older than the window (called now and then). */
  pruneAll() {
    for (const trail of this.byId.values()) {
      const before = trail.points.length;
      this.prune(trail);
      if (trail.points.length !== before) this.draw(trail);
    }
  }

  prune(trail) {
    const oldest = this.now() - this.windowMs;
    // The newest point stays while the pin does: it is where the trail ends.
    while (trail.points.length > 1 && trail.points[0].ts < oldest) trail.points.shift();
  }

  draw(trail) {
    if (!this.visible) return;
    const latlngs = trail.points.map((p) => [p.lat, p.lng]);
    if (latlngs.length < 2) {
      if (trail.line) this.layer.removeLayer(trail.line);
      trail.line = null;
      return;
    }
    if (trail.line) {
      trail.line.setLatLngs(latlngs);
    } else {
      trail.line = L.polyline(latlngs, {
        className: trail.mine ? 'trail trail-mine' : 'trail',
        interactive: false,
        weight: 4,
        lineCap: 'round',
        lineJoin: 'round',
      });
      // Leaflet makes a new <path> each time the line is added to the map.
      trail.line.on('add', (e) => { e.target.getElement().dataset.trailId = trail.id; });
      this.layer.addLayer(trail.line);
    }
  }

  /** For tests: the points the page holds for `id`, oldest first. */
  points(id) {
    const trail = this.byId.get(id);
    return trail ? trail.points.map((p) => [p.lat, p.lng]) : [];
  }
}
