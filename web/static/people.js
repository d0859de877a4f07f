// The people list: everyone on the map, nearest first, the viewer on top as
// "you". A tap on a person asks app.js to follow them. On a phone the panel
// is one line until it is opened; on a larger screen it starts open. On a
// big map it counts the server's total, and its search asks the server for
// the people the page is not sent.
//
// Hooks for tests from outside (docs/architecture.md, "The page"): the list
// is [data-people-list], each row [data-person-id="{pin id}"], and the
// control that opens the panel [data-people-toggle].

import {batteryLevel, distanceMetres, fixAge, formatDistance, ago, sourceLabel} from './format.js';

const SEARCH_FROM = 9; // the search box shows once more than 8 people are on the map
const MAX_ROWS = 100; // more rows than this would not be read; the search finds the rest
const RENDER_DELAY_MS = 150; // a burst of updates renders once
const BIG_RENDER_DELAY_MS = 1000; // ... and once a second on a map of hundreds
const BIG_LIST = 300;
const SEARCH_DELAY_MS = 250; // the server is asked once typing pauses
const SEARCH_LIMIT = 100;

/** Lower case without accents, so "jose" finds "José". */
function folded(text) {
  return text.normalize('NFD').replace(/[\u0300-\u036f]/g, '').toLowerCase();
}

export class PeoplePanel {
  /**
   * @param {object} el the panel's elements (root, toggle, count, summary, body, list,
   *   searchBox, search, more, unfollow, template)
   * @param {object} app {people(): person[], context(): {origin, now, following, notLiveFor,
   *   stale}, total(): number|null (everyone on the map, when the server says), search(query):
   *   Promise<person[]|null>|null (the server's search: null where it has none),
   *   choose(id, person), unfollow(), changed()}
   */
  constructor(el, app) {
    this.el = el;
    this.app = app;
    this.rows = new Map(); // pin id -> row elements
    this.timer = null;
    this.isOpen = false;
    this.order = [];
    this.count = 0;
    // The server's answer to the search box on a big map: {query, people}.
    this.found = null;
    this.searchTimer = null;
    this.asked = null; // the query the server is being asked
    el.toggle.addEventListener('click', () => this.setOpen(!this.isOpen));
    el.unfollow.addEventListener('click', () => app.unfollow());
    el.search.addEventListener('input', () => this.render());
    el.list.addEventListener('click', (e) => {
      const row = e.target.closest('[data-person-id]');
      if (!row) return;
      const id = row.dataset.personId;
      const found = this.found && this.found.people.find((p) => p.id === id);
      app.choose(id, found || null);
    });
    el.root.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && this.isOpen && this.collapsible()) {
        this.setOpen(false);
        el.toggle.focus();
      }
    });
  }

  /** Whether the panel is a one-liner by default here (a phone, portrait or landscape). */
  collapsible() {
    return this.app.compact();
  }

  setOpen(open) {
    this.isOpen = open;
    this.el.root.classList.toggle('open', open);
    this.el.toggle.setAttribute('aria-expanded', String(open));
    this.el.body.hidden = !open;
    this.render();
    this.app.changed();
  }

  /** Something changed: render soon (once for a burst of updates). */
  invalidate() {
    if (this.timer !== null) return;
    this.timer = setTimeout(() => this.render(),
                            this.count > BIG_LIST ? BIG_RENDER_DELAY_MS : RENDER_DELAY_MS);
  }

  // A big map: the page holds only what it shows, so a name is looked up by
  // the server (null from app.search: it cannot, and the list searches itself).
  askServer(query) {
    if (!query) {
      this.found = null;
      this.asked = null;
      clearTimeout(this.searchTimer);
      return;
    }
    if (this.asked === query || (this.found && this.found.query === query)) return;
    this.asked = query;
    clearTimeout(this.searchTimer);
    this.searchTimer = setTimeout(() => {
      const asking = this.app.search(query);
      if (!asking) {
        this.asked = null;
        return;
      }
      asking.then((people) => {
        if (this.asked !== query) return;
        this.asked = null;
        if (people) {
          this.found = {query, people};
          this.render();
        }
      });
    }, SEARCH_DELAY_MS);
  }

  render() {
    clearTimeout(this.timer);
    this.timer = null;
    const ctx = this.app.context();
    const people = this.app.people().map((p) => ({
      ...p,
      distance: ctx.origin && !p.mine ? distanceMetres(ctx.origin, p) : null,
    }));
    people.sort((a, b) => (b.mine - a.mine) ||
      ((a.distance ?? Infinity) - (b.distance ?? Infinity)) ||
      a.label.localeCompare(b.label) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    const total = this.app.total();
    const n = total !== null ? Math.max(total, people.length) : people.length;
    this.count = n;
    this.el.count.textContent = `${n.toLocaleString('en-US')} ${n === 1 ? 'person' : 'people'}`;
    this.renderSummary(people, ctx);

    this.el.searchBox.hidden = n < SEARCH_FROM;
    if (!this.isOpen) return;
    const typed = this.el.searchBox.hidden ? '' : this.el.search.value.trim();
    const query = folded(typed);
    // On a map bigger than what the page holds, the server finds the rest.
    if (total !== null && total > people.length) this.askServer(typed);
    else this.askServer('');
    let shown = query ? people.filter((p) => folded(p.label).includes(query)) : people;
    if (query && this.found && this.found.query === typed) {
      const have = new Set(shown.map((p) => p.id));
      const more = this.found.people.filter((p) => !have.has(p.id)).map((p) => ({
        ...p,
        distance: ctx.origin && !p.mine ? distanceMetres(ctx.origin, p) : null,
      }));
      shown = shown.concat(more).sort((a, b) => (b.mine - a.mine) ||
        ((a.distance ?? Infinity) - (b.distance ?? Infinity)) || a.label.localeCompare(b.label));
    }
    const rows = shown.slice(0, MAX_ROWS);
    const keep = new Set(rows.map((p) => p.id));
    for (const [id, row] of this.rows) {
      if (!keep.has(id)) {
        row.item.remove();
        this.rows.delete(id);
      }
    }
    const order = rows.map((p) => p.id);
    for (const person of rows) this.renderRow(person, ctx);
    if (order.join('\n') !== this.order.join('\n')) {
      // Re-append in order: nodes move, nothing is rebuilt, focus stays.
      this.el.list.append(...rows.map((p) => this.rows.get(p.id).item));
      this.order = order;
    }
    const hidden = shown.length - rows.length;
    this.el.more.hidden = hidden <= 0 && !(query && shown.length === 0);
    this.el.more.textContent = query && shown.length === 0
      ? 'Nobody by that name'
      : `and ${hidden} more: find them by name`;
  }

  renderSummary(people, ctx) {
    const followed = ctx.following && people.find((p) => p.id === ctx.following);
    this.el.unfollow.hidden = !followed;
    this.el.root.classList.toggle('is-following', Boolean(followed));
    if (followed) {
      this.el.unfollow.setAttribute('aria-label', `Stop following ${followed.label}`);
      const where = followed.distance !== null ? ` \u00b7 ${formatDistance(followed.distance)}` : '';
      this.el.summary.textContent = `Following ${followed.label}${where}`;
      return;
    }
    const others = people.filter((p) => !p.mine);
    const total = this.app.total();
    if (others.length === 0 && total !== null && total > people.length) {
      // A big map's people are all in the clusters around: none in reach of a name.
      this.el.summary.textContent = 'zoom in to see names';
    } else if (others.length === 0) {
      this.el.summary.textContent = people.length ? 'only you so far' : '';
    } else if (others[0].distance !== null) {
      this.el.summary.textContent =
        `nearest: ${others[0].label} \u00b7 ${formatDistance(others[0].distance)}`;
    } else {
      this.el.summary.textContent = others.map((p) => p.label).join(', ');
    }
  }

  renderRow(person, ctx) {
    let row = this.rows.get(person.id);
    if (!row) {
      const item = this.el.template.content.firstElementChild.cloneNode(true);
      row = {
        item,
        button: item.querySelector('.person'),
        name: item.querySelector('.person-name'),
        you: item.querySelector('.person-you'),
        source: item.querySelector('.person-source'),
        age: item.querySelector('.person-age'),
        battery: item.querySelector('.person-battery'),
        level: item.querySelector('.battery-level'),
        live: item.querySelector('.person-live'),
        distance: item.querySelector('.person-distance'),
        seen: {},
      };
      row.button.dataset.personId = person.id;
      this.rows.set(person.id, row);
    }
    const age = Number.isFinite(person.ts) ? Math.max(0, ctx.now - person.ts) : null;
    const stale = age !== null && age >= ctx.stale;
    const battery = batteryLevel(person.battery);
    const source = sourceLabel(person.source);
    const view = {
      // The viewer without a name yet: how the others see them, beside the
      // "you" badge (the map's label "you" would read "you you" here).
      name: person.mine && !person.named ? 'anonymous' : person.label,
      unnamed: !person.named,
      mine: person.mine,
      source: source || '',
      age: age === null ? '' : stale ? `last seen ${ago(age)}` : fixAge(age),
      stale,
      battery: battery === null ? '' : `${battery}%`,
      low: battery !== null && battery <= 15,
      notLive: ctx.notLiveFor !== null,
      distance: person.mine ? (person.accuracy ? `\u00b1${formatDistance(person.accuracy)}` : '')
        : person.distance !== null ? formatDistance(person.distance) : '',
      following: ctx.following === person.id,
    };
    // Touch the DOM only where something changed (this runs every second).
    const seen = row.seen;
    if (seen.name !== view.name) row.name.textContent = view.name; // text, never HTML
    if (seen.unnamed !== view.unnamed) row.name.classList.toggle('unnamed', view.unnamed);
    if (seen.mine !== view.mine) {
      row.you.hidden = !view.mine;
      row.item.classList.toggle('you', view.mine); // not .mine: that is the pin
    }
    if (seen.source !== view.source) {
      row.source.textContent = view.source;
      row.source.hidden = !view.source;
    }
    if (seen.age !== view.age) row.age.textContent = view.age;
    if (seen.stale !== view.stale) row.item.classList.toggle('stale', view.stale);
    if (seen.battery !== view.battery) {
      row.level.textContent = view.battery;
      row.battery.hidden = !view.battery;
    }
    if (seen.low !== view.low) row.battery.classList.toggle('low', view.low);
    if (seen.notLive !== view.notLive) row.live.hidden = !view.notLive;
    if (seen.distance !== view.distance) row.distance.textContent = view.distance;
    if (seen.following !== view.following) {
      row.button.setAttribute('aria-pressed', String(view.following));
      row.item.classList.toggle('following', view.following);
    }
    row.seen = view;
  }
}
