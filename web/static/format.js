// Pure helpers of the map page: distances, ages, what a pin's extra fields say.
// No DOM, no Leaflet: app.js and people.js share them.

const EARTH_RADIUS_M = 6371008.8;
const NOW_MS = 5000; // a fix younger than this is "now"

/** Great-circle distance in metres between two {lat, lng} (haversine). */
export function distanceMetres(a, b) {
  const rad = Math.PI / 180;
  const dLat = (b.lat - a.lat) * rad;
  const dLng = (b.lng - a.lng) * rad;
  const h = Math.sin(dLat / 2) ** 2 +
    Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dLng / 2) ** 2;
  return 2 * EARTH_RADIUS_M * Math.asin(Math.min(1, Math.sqrt(h)));
}

/** "40 m", "350 m", "1.2 km", "18 km": as precise as a glance needs. */
export function formatDistance(metres) {
  if (!Number.isFinite(metres)) return '';
  if (metres < 995) return `${Math.max(10, Math.round(metres / 10) * 10)} m`;
  const km = metres / 1000;
  if (km < 9.95) return `${km.toFixed(1)} km`;
  return `${Math.round(km).toLocaleString('en-US')} km`;
}

/** How long ago, in the words of the page: "12 s ago", "11 min ago", "1 h ago", "3 days ago". */
export function ago(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s ago`;
  const min = Math.floor(s / 60);
  if (min < 60) return `${min} min ago`;
  const h = Math.floor(min / 60);
  if (h < 48) return `${h} h ago`;
  return `${Math.floor(h / 24)} days ago`;
}

/** The age of a fix for the people list: "now" when it is fresh. */
export function fixAge(ms) {
  return ms < NOW_MS ? 'now' : ago(ms);
}

/** "12 s", "3 min", "1 h": how long something has lasted. */
export function duration(ms) {
  return ago(ms).replace(/ ago$/, '');
}

// Apps that report in the background (docs/protocol.md): the wire value and
// how the page names it. Anything else an app says is shown as "app".
const SOURCES = new Map([
  ['owntracks', 'OwnTracks'],
  ['osmand', 'OsmAnd'],
  ['overland', 'Overland'],
]);

/** The badge text of an app-fed pin, or null for a browser's pin. */
export function sourceLabel(source) {
  if (typeof source !== 'string' || !source) return null;
  return SOURCES.get(source) || 'app';
}

/** A battery level 0-100, or null when unknown or out of range. */
export function batteryLevel(battery) {
  if (typeof battery !== 'number' || !Number.isFinite(battery)) return null;
  if (battery < 0 || battery > 100) return null;
  return Math.round(battery);
}
