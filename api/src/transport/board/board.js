// The status board: every resource's sync state, live over GraphQL over SSE,
// with the health rule recomputed as time passes, the alerts the
// server holds (the `alerts` query: what webhooks are told), and each
// resource's recent runs (syncTrends) as a small chart.
//
// One stream per open board and no polling: the page subscribes with
// `initial: true`, resumes with `Last-Event-ID` after any break, asks for
// a resource's trend again only when a change ends one of its runs, and
// for the alerts only after a change or when the alert rules say time
// alone may have changed one.
'use strict';

const TOKEN_KEY = 'vantage-sync-token';
const STUCK_MS = 30 * 60 * 1000;
const STALE_MS = 24 * 60 * 60 * 1000;
const RETRY_MS = [250, 500, 1000, 2000, 5000];
const STATUS_RANK = { FAILED: 0, RUNNING: 1, NEVER_RUN: 2, SUCCESS: 3 };
const STATE = `resource lastSyncStatus lastSyncTime startedAt completedAt durationMs
  recordsSynced recordsCreated recordsUpdated errorCount consecutiveFailures
  errors { code message recordId timestamp }`;
const CHANGES = `subscription { syncStateChanged(initial: true) {
  operation resource cursor state { ${STATE} } } }`;
const TREND_RUNS = 20;
const TRENDS = `query($resources: [String!]) { syncTrends(resources: $resources, last: ${TREND_RUNS}) {
  resource successRate p50DurationMs p95DurationMs
  runs { status startedAt completedAt durationMs } } }`;
const FIRING = '{ alerts { alert resource } }';
// While the server's alerts differ from what the rule predicts (the server
// checks stuck and stale on a timer), ask again this often, this many times.
const ALERT_RETRY_MS = 1000;
const ALERT_RETRIES = 20;
const ALERTS = {
  failed: 'Failed',
  stuck: 'Stuck',
  stale: 'Stale',
  repeated: 'Failing repeatedly',
};

const board = {
  token: null,
  states: new Map(),
  trends: new Map(),
  lastEventId: null,
  attempt: 0,
  stream: null,
  // Server time minus this browser's, from the stream's Date header.
  skewMs: 0,
  // The server's firing alerts ([{alert, resource}]), null until asked.
  firing: null,
  alertTimer: null,
  alertRetries: 0,
  // What the rule predicted when the alerts were last asked for.
  predicted: null,
};

const $ = (id) => document.getElementById(id);
const now = () => Date.now() + board.skewMs;

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function svgElement(tag, attributes) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

// ---- sign-in -------------------------------------------------------------

/** The token from `#token=…` (then gone from the address bar) or the session. */
function takeToken() {
  const match = /^#token=(.+)$/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function askForToken(problem) {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  board.token = null;
  $('sign-in').hidden = false;
  $('sign-out').hidden = true;
  $('sign-in-error').textContent = problem || '';
  setConnection('signed-out', 'Signed out');
  $('token').focus();
}

function start(token) {
  board.token = token;
  $('sign-in').hidden = true;
  $('sign-out').hidden = false;
  board.states.clear();
  board.lastEventId = null;
  board.firing = null;
  board.predicted = null;
  render();
  follow();
  loadTrends(null);
}

function stop() {
  if (board.stream) board.stream.abort();
  board.stream = null;
}

// ---- talking to the API --------------------------------------------------

function headers(extra) {
  return Object.assign({
    'Content-Type': 'application/json',
    Authorization: `Bearer ${board.token}`,
  }, extra);
}

/** The first error's code and message of a GraphQL response, if any. */
function firstError(body) {
  const error = body && body.errors && body.errors[0];
  return error ? { code: error.extensions && error.extensions.code, message: error.message } : null;
}

function refusedToken(error) {
  return error && (error.code === 'INVALID_TOKEN' || error.code === 'UNAUTHENTICATED'
    || error.code === 'FORBIDDEN');
}

async function loadTrends(resources) {
  const token = board.token;
  let body;
  try {
    const response = await fetch('/graphql', {
      method: 'POST',
      headers: headers(),
      body: JSON.stringify({ query: TRENDS, variables: { resources } }),
    });
    body = await response.json();
  } catch (_) {
    return; // The stream's reconnection shows the outage; trends come back with it.
  }
  if (token !== board.token) return;
  const error = firstError(body);
  if (refusedToken(error)) return askForToken(error.message);
  for (const trend of (body.data && body.data.syncTrends) || []) {
    board.trends.set(trend.resource, trend);
  }
  render();
}

/** Asks for the server's alerts after `delay` ms (one ask pending at a time). */
function askAlerts(delay) {
  if (board.alertTimer !== null || !board.token) return;
  board.alertTimer = setTimeout(loadAlerts, delay);
}

async function loadAlerts() {
  board.alertTimer = null;
  const token = board.token;
  if (!token) return;
  const predicted = alertText(ruleAlerts(sortedStates()));
  let body;
  try {
    const response = await fetch('/graphql', {
      method: 'POST',
      headers: headers(),
      body: JSON.stringify({ query: FIRING }),
    });
    body = await response.json();
  } catch (_) {
    return; // The stream's reconnection shows the outage; a change asks again.
  }
  if (token !== board.token) return;
  const error = firstError(body);
  if (refusedToken(error)) return askForToken(error.message);
  if (!body.data) return;
  board.firing = body.data.alerts;
  board.predicted = predicted;
  render();
  if (alertText(serverAlerts()) === predicted) {
    board.alertRetries = 0;
  } else if (board.alertRetries < ALERT_RETRIES) {
    board.alertRetries += 1;
    askAlerts(ALERT_RETRY_MS);
  }
}

/** Follows every change until signed out, resuming after any break. */
async function follow() {
  stop();
  const controller = new AbortController();
  board.stream = controller;
  const extra = { Accept: 'text/event-stream' };
  if (board.lastEventId) extra['Last-Event-ID'] = board.lastEventId;
  let outcome;
  try {
    const response = await fetch('/graphql', {
      method: 'POST',
      headers: headers(extra),
      body: JSON.stringify({ query: CHANGES }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = firstError(await response.json().catch(() => null));
      if (refusedToken(error)) return askForToken(error.message);
      outcome = 'retry';
    } else {
      const date = Date.parse(response.headers.get('Date') || '');
      if (Number.isFinite(date) && Math.abs(date - Date.now()) > 5000) board.skewMs = date - Date.now();
      setConnection('live', 'Live');
      board.attempt = 0;
      outcome = await readEvents(response.body, controller);
    }
  } catch (_) {
    outcome = 'retry';
  }
  if (controller.signal.aborted || board.stream !== controller) return;
  if (outcome === 'signed-out') return;
  setConnection('reconnecting', 'Reconnecting…');
  const delay = RETRY_MS[Math.min(board.attempt, RETRY_MS.length - 1)];
  board.attempt += 1;
  setTimeout(() => { if (board.stream === controller) follow(); }, delay);
}

/** Reads server-sent events until the stream ends; what to do next. */
async function readEvents(body, controller) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done || controller.signal.aborted) return 'retry';
    buffer += value;
    for (let end = buffer.search(/\r?\n\r?\n/); end >= 0; end = buffer.search(/\r?\n\r?\n/)) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
      const event = { type: 'message', id: null, data: [] };
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') event.type = text;
        else if (field === 'id') event.id = text;
        else if (field === 'data') event.data.push(text);
      }
      if (event.type === 'complete') return 'retry';
      if (event.type !== 'next') continue;
      const outcome = onNext(JSON.parse(event.data.join('\n')), event.id);
      if (outcome) return outcome;
    }
  }
}

function onNext(payload, id) {
  const error = firstError(payload);
  if (refusedToken(error)) {
    askForToken(error.message);
    return 'signed-out';
  }
  if (error && error.code === 'CURSOR_EXPIRED') {
    // Too far behind: start again from a fresh snapshot.
    board.lastEventId = null;
    board.states.clear();
    return 'retry';
  }
  if (error) return 'retry';
  const change = payload.data.syncStateChanged;
  apply(change);
  if (id) board.lastEventId = id;
  // Once per change, and once for a whole snapshot (its last event alone
  // carries an id). The worker that settles alerts hears the same change:
  // give it a moment.
  if (change.operation !== 'SNAPSHOT' || id) {
    board.alertRetries = 0;
    askAlerts(change.operation === 'SNAPSHOT' ? 0 : 300);
  }
  return null;
}

/** Applies one change; asks for the trend again when it ended a run. */
function apply(change) {
  const before = board.states.get(change.resource);
  if (change.operation === 'DELETE') {
    board.states.delete(change.resource);
    board.trends.delete(change.resource);
  } else {
    board.states.set(change.resource, change.state);
    const state = change.state;
    const wasRunning = before && before.lastSyncStatus === 'RUNNING';
    const ended = wasRunning && state.lastSyncStatus !== 'RUNNING';
    const restarted = wasRunning && state.lastSyncStatus === 'RUNNING'
      && Date.parse(state.startedAt) > Date.parse(before.startedAt);
    if (change.operation !== 'SNAPSHOT' && (ended || restarted)) loadTrends([change.resource]);
  }
  render();
}

// ---- the dashboard's health and alert rules -------------------------------

function ageMs(at) {
  return at ? now() - Date.parse(at) : null;
}

function isStuck(state) {
  return state.lastSyncStatus === 'RUNNING' && ageMs(state.startedAt) > STUCK_MS;
}

function isStale(state) {
  const age = ageMs(state.lastSyncTime);
  return age === null || age > STALE_MS;
}

/** RED: failed or stuck; YELLOW: never run or no success in 24 h; else GREEN. */
function health(state) {
  if (state.lastSyncStatus === 'FAILED' || isStuck(state)) return 'RED';
  if (state.lastSyncStatus === 'NEVER_RUN' || isStale(state)) return 'YELLOW';
  return 'GREEN';
}

/** The alert rules, by kind, as [kind, [resource]] (the server's
 *  definition: failed until a run succeeds, a running retry included). */
function ruleAlerts(states) {
  const holding = {
    failed: states.filter((state) => state.lastSyncStatus === 'FAILED' || state.consecutiveFailures >= 1),
    stuck: states.filter(isStuck),
    stale: states.filter(isStale),
    repeated: states.filter((state) => state.consecutiveFailures >= 3),
  };
  return Object.entries(holding)
    .map(([kind, list]) => [kind, list.map((state) => state.resource)])
    .filter(([, list]) => list.length > 0);
}

/** The server's firing alerts in the same shape, resources in board order. */
function serverAlerts() {
  const order = new Map(sortedStates().map((state, index) => [state.resource, index]));
  const rank = (resource) => (order.has(resource) ? order.get(resource) : order.size);
  return Object.keys(ALERTS)
    .map((kind) => [kind, (board.firing || [])
      .filter((alert) => alert.alert.toLowerCase() === kind)
      .map((alert) => alert.resource)
      .sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0))])
    .filter(([, list]) => list.length > 0);
}

// ---- rendering -------------------------------------------------------------

function setConnection(state, text) {
  document.documentElement.dataset.connection = state;
  $('connection-text').textContent = text;
}

function relative(at) {
  if (!at) return 'never';
  const seconds = Math.max(0, Math.round(ageMs(at) / 1000));
  if (seconds < 5) return 'just now';
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 36 * 3600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function duration(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.round(ms / 60000)} min`;
}

const number = (value) => (value === null || value === undefined ? '—' : value.toLocaleString('en'));

function time(at) {
  const node = element('time', { datetime: at || '' }, relative(at));
  if (at) node.title = new Date(at).toLocaleString();
  node.dataset.relative = '';
  return node;
}

function facts(state) {
  const list = element('dl', { class: 'facts' });
  const add = (term, ...value) => list.append(element('dt', {}, term), element('dd', {}, ...value));
  add('Status', state.lastSyncStatus.replace('_', ' ').toLowerCase());
  if (state.lastSyncStatus === 'RUNNING') add('Started', time(state.startedAt));
  add('Last sync', time(state.lastSyncTime));
  add('Duration', duration(state.durationMs));
  add('Records', `${number(state.recordsSynced)} synced · ${number(state.recordsCreated)} created · ${number(state.recordsUpdated)} updated`);
  if (state.errorCount > 0) {
    const items = element('ul');
    for (const error of state.errors) {
      const record = error.recordId ? ` (record ${error.recordId})` : '';
      items.append(element('li', {}, element('code', {}, error.code), ` ${error.message}${record}`));
    }
    add('Errors', element('details', {}, element('summary', {}, `${state.errorCount} error${state.errorCount === 1 ? '' : 's'}`), items));
  } else {
    add('Errors', '0');
  }
  add('Failures in a row', String(state.consecutiveFailures));
  return list;
}

/** The last runs, oldest left: a bar per run (height: duration) over a mark
 *  per outcome (filled square: success, cross: failed, hollow: abandoned). */
function trendChart(trend) {
  if (trend.runs.length === 0) return element('div', { class: 'trend' }, 'No runs yet');
  const runs = trend.runs.slice().reverse();
  const slot = 12;
  const svg = svgElement('svg', {
    viewBox: `0 0 ${TREND_RUNS * slot} 48`, role: 'img', preserveAspectRatio: 'xMinYMid meet',
  });
  const successes = trend.runs.filter((run) => run.status === 'SUCCESS').length;
  let summary = `${successes} of ${trend.runs.length} runs succeeded`;
  if (successes > 0) summary += `; median ${duration(trend.p50DurationMs)}, p95 ${duration(trend.p95DurationMs)}`;
  svg.setAttribute('aria-label', `Last runs, oldest first: ${summary}`);
  const longest = Math.max(1, ...runs.map((run) => run.durationMs || 0));
  runs.forEach((run, index) => {
    const x = index * slot + 2;
    const group = svgElement('g', {});
    const title = svgElement('title', {});
    title.textContent = `${run.status.toLowerCase()}, ${duration(run.durationMs)}, ${run.completedAt ? new Date(run.completedAt).toLocaleString() : ''}`;
    group.append(title);
    const height = run.durationMs ? Math.max(2, Math.round((run.durationMs / longest) * 32)) : 32;
    group.append(svgElement('rect', { class: `bar-${run.status}`, x, y: 34 - height, width: 8, height }));
    if (run.status === 'FAILED') {
      group.append(svgElement('path', { class: 'mark-FAILED', d: `M${x} 38 l8 8 M${x + 8} 38 l-8 8` }));
    } else {
      group.append(svgElement('rect', { class: `mark-${run.status}`, x: x + 0.5, y: 38.5, width: 7, height: 7 }));
    }
    svg.append(group);
  });
  return element('div', { class: 'trend' }, svg, element('span', {}, summary));
}

function card(state) {
  const level = health(state);
  const reason = state.lastSyncStatus === 'FAILED' ? 'failed'
    : isStuck(state) ? 'stuck'
      : state.lastSyncStatus === 'NEVER_RUN' ? 'waiting for a first run'
        : state.lastSyncStatus === 'RUNNING' ? 'running'
          : isStale(state) ? 'stale' : 'ok';
  const node = element('article', {
    class: 'resource',
    'data-resource': state.resource,
    'data-health': level,
    'data-status': state.lastSyncStatus,
    'data-consecutive-failures': String(state.consecutiveFailures),
    tabindex: '0',
  });
  node.append(element('header', {}, element('h2', {}, state.resource), element('span', { class: 'health' }, `${level} · ${reason}`)));
  node.append(facts(state));
  const trend = board.trends.get(state.resource);
  if (trend) node.append(trendChart(trend));
  return node;
}

function sortedStates() {
  return [...board.states.values()].sort((a, b) => (STATUS_RANK[a.lastSyncStatus] - STATUS_RANK[b.lastSyncStatus])
    || (a.resource < b.resource ? -1 : a.resource > b.resource ? 1 : 0));
}

/** Who an alert is firing for. A resource that has never run is stale by
 *  definition (no success in the last 24 hours), and a new install has
 *  nothing but those: say so, rather than leave a fresh board looking like
 *  an incident. */
function alertDetail(kind, list) {
  if (kind !== 'stale') return list.join(', ');
  const state = (resource) => board.states.get(resource);
  const groups = [
    ['no successful sync in 24 hours', (resource) => state(resource)?.lastSyncTime],
    ['no successful sync yet', (resource) => !state(resource)?.lastSyncTime && state(resource)?.lastSyncStatus !== 'NEVER_RUN'],
    ['waiting for a first run', (resource) => state(resource)?.lastSyncStatus === 'NEVER_RUN'],
  ];
  return groups
    .map(([reason, holds]) => [reason, list.filter(holds)])
    .filter(([, resources]) => resources.length > 0)
    .map(([reason, resources]) => `${resources.join(', ')}: ${reason}`)
    .join('; ');
}

/** Alerts as text, to compare them. */
function alertText(alerts) {
  return alerts.map(([kind, list]) => `${kind}: ${list.join(', ')}`).join('\n');
}

function render() {
  const states = sortedStates();
  // Rebuilt whole, keeping what the reader had open or focused.
  const open = new Set([...document.querySelectorAll('.resource details[open]')]
    .map((details) => details.closest('.resource').dataset.resource));
  const active = document.activeElement;
  const focusedCard = active && active.closest ? active.closest('.resource') : null;
  const focus = focusedCard && { resource: focusedCard.dataset.resource, summary: active.tagName === 'SUMMARY' };
  const cards = states.map((state) => {
    const node = card(state);
    if (open.has(state.resource)) node.querySelector('details')?.setAttribute('open', '');
    return node;
  });
  $('resources').replaceChildren(...cards);
  const firing = serverAlerts();
  $('alerts').replaceChildren(...firing.map(([kind, list]) => element('p', { class: 'alert', 'data-alert': kind },
    element('strong', {}, ALERTS[kind]), ' ', alertDetail(kind, list))));
  if (focus) {
    const again = cards.find((node) => node.dataset.resource === focus.resource);
    const target = again && (focus.summary ? again.querySelector('summary') : again);
    if (target) target.focus();
  }
}

/** Time passes: relative times tick, and health follows them; when the
 *  rule says an alert may have changed, the server is asked. The cards are
 *  rebuilt only when a health changed. */
function tick() {
  const states = sortedStates();
  if (board.predicted !== null && alertText(ruleAlerts(states)) !== board.predicted) {
    board.alertRetries = 0;
    board.predicted = alertText(ruleAlerts(states));
    askAlerts(0);
  }
  const moved = [...document.querySelectorAll('.resource')].some((node) => {
    const state = board.states.get(node.dataset.resource);
    return state && health(state) !== node.dataset.health;
  });
  if (moved) {
    render();
    return;
  }
  for (const node of document.querySelectorAll('time[data-relative]')) node.textContent = relative(node.getAttribute('datetime'));
}

document.addEventListener('DOMContentLoaded', () => {
  $('sign-in').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('token').value.trim().replace(/^Bearer\s+/i, '');
    $('token').value = '';
    sessionStorage.setItem(TOKEN_KEY, token);
    start(token);
  });
  $('sign-out').addEventListener('click', () => askForToken());
  setInterval(tick, 1000);
  const token = takeToken();
  if (token) start(token);
  else askForToken();
});
