// Front end of `qwen-tune ui`: four tabs (Data, Launch, Watch, Talk) over the local server's JSON API.
// Text from data files, model replies and the server is untrusted: it only ever reaches the page
// through textContent or text nodes, never as HTML.
'use strict';

// ---------------------------------------------------------------- helpers

const $ = (id) => document.getElementById(id);

const TOKEN_KEY = 'qwen-tune-token';

// The server prints the URL with ?token=T; keep it for this tab so a reload still works.
function sessionToken() {
  const fromUrl = new URLSearchParams(location.search).get('token');
  if (fromUrl) sessionStorage.setItem(TOKEN_KEY, fromUrl);
  return sessionStorage.getItem(TOKEN_KEY);
}

const token = sessionToken();

// GET `path` (query string included), or POST `body` as JSON. Resolves with the parsed answer;
// rejects with an Error carrying the server's message for `ok: false` and HTTP errors.
async function api(path, body) {
  // The custom header makes every call a non-simple request, which other sites cannot forge.
  const headers = {'X-Qwen-Tune': '1'};
  if (token) headers['X-Qwen-Tune-Token'] = token;
  const init = {headers};
  if (body !== undefined) {
    init.method = 'POST';
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Error(`cannot reach the qwen-tune server (${err.message})`);
  }
  const data = await response.json().catch(() => null);
  if (!data || data.ok === false || !response.ok) {
    throw new Error(data?.error || `${response.status} ${response.statusText}`);
  }
  return data;
}

// createElement with properties; string children become text nodes (never parsed as HTML).
function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// Show `text` in a message area (hidden when empty); `isError` adds the `error` class.
function showMessage(target, text, isError = false) {
  target.textContent = text;
  target.hidden = !text;
  target.classList.toggle('error', isError);
}

// api() with its error shown in `target`, which a success clears. Resolves with the answer or null.
async function call(target, path, body) {
  try {
    const data = await api(path, body);
    showMessage(target, '');
    return data;
  } catch (err) {
    showMessage(target, err.message, true);
    return null;
  }
}

// Disable `button` while `task` runs, so a slow request cannot be sent twice.
async function withBusy(button, task) {
  button.disabled = true;
  try {
    return await task();
  } finally {
    button.disabled = false;
  }
}

function fillDatalist(id, values) {
  $(id).replaceChildren(...values.map((value) => el('option', {value})));
}

function formatNumber(value, digits) {
  return value == null ? '-' : value.toFixed(digits);
}

function formatEta(seconds) {
  if (seconds == null) return '-';
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// ---------------------------------------------------------------- tabs

const TABS = ['data', 'launch', 'watch', 'talk'];
let activeTab = 'data';

function showTab(name) {
  activeTab = name;
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    button.classList.toggle('active', tab === name);
    button.setAttribute('aria-selected', String(tab === name));
    $(`panel-${tab}`).hidden = tab !== name;
  }
  if (name === 'watch') pollSoon();
  else stopPolling();
}

// Fill the suggestion lists and the method menu from what the server found under its roots.
async function loadInfo() {
  const info = await call($('data-error'), '/api/info');
  if (!info) return;
  fillDatalist('data-files-list', info.data_files || []);
  fillDatalist('models-list', info.models || []);
  fillDatalist('recipes-list', info.recipes || []);
  const methods = info.methods || [];
  $('launch-method').replaceChildren(...methods.map((m) => el('option', {value: m}, m)));
  const roots = (info.roots || []).join(', ');
  $('roots').textContent = roots && `files under ${roots}`;
  onMethodChange();
}

// ---------------------------------------------------------------- data

const SAMPLE_LIMIT = 20;

// One sample: a header line, then the rendered conversation with the supervised spans marked.
function sampleCard(sample) {
  const header = el('div', {className: 'sample-header'},
    el('span', {className: 'sample-id'}, sample.id),
    ` ${sample.tokens} tokens, ${sample.supervised} supervised`);
  if (sample.truncated) header.append(el('span', {className: 'badge truncated'}, 'truncated'));
  const spans = sample.spans.map(([text, supervised]) =>
    supervised ? el('mark', {className: 'supervised'}, text) : text);
  return el('div', {className: 'sample'}, header, el('pre', {className: 'conversation'}, ...spans));
}

function showDataResult({format = '', summary = '', total = 0, samples = []}) {
  $('data-format').textContent = format;
  $('data-summary').textContent = summary;
  $('data-count').textContent = samples.length ? `showing ${samples.length} of ${total} samples` : '';
  $('data-samples').replaceChildren(...samples.map(sampleCard));
}

async function loadData() {
  const body = {
    data: $('data-path').value.trim(),
    model: $('data-model').value.trim(),
    chat_template: $('data-template').value.trim(),
    max_length: Number($('data-max-length').value) || 1024,
    limit: SAMPLE_LIMIT,
  };
  const result = await withBusy($('data-load'), () => call($('data-error'), '/api/data', body));
  showDataResult(result || {});  // an error clears the old samples rather than leave them looking current
}

// ---------------------------------------------------------------- launch

// The launch form's inputs and the CLI options they fill; `onlyFor` limits a field to some methods (each also has a
// `<label id="ID-field">` shown only for them). The server renames model and data for ppo / grpo (--policy, --prompts).
const LAUNCH_FIELDS = [
  {id: 'launch-config', option: 'config', kind: 'text'},
  {id: 'launch-model', option: 'model_name_or_path', kind: 'text'},
  {id: 'launch-data', option: 'data_path', kind: 'text'},
  {id: 'launch-output', option: 'output_dir', kind: 'text'},
  {id: 'launch-reward-model', option: 'reward_model', kind: 'text', onlyFor: ['ppo', 'grpo']},
  {id: 'launch-teacher', option: 'teacher', kind: 'text', onlyFor: ['distill']},
  {id: 'launch-epochs', option: 'num_train_epochs', kind: 'number'},
  {id: 'launch-lr', option: 'learning_rate', kind: 'number'},
  {id: 'launch-batch', option: 'per_device_train_batch_size', kind: 'number'},
  {id: 'launch-max-length', option: 'model_max_length', kind: 'number'},
  {id: 'launch-lora', option: 'use_lora', kind: 'flag'},
  {id: 'launch-qlora', option: 'q_lora', kind: 'flag'},
];

// The body shared by /api/command, /api/yaml and /api/launch: only the fields the user filled.
function launchBody() {
  const method = $('launch-method').value;
  const options = {};
  for (const field of LAUNCH_FIELDS) {
    if (field.onlyFor && !field.onlyFor.includes(method)) continue;
    const input = $(field.id);
    if (field.kind === 'flag') {
      if (input.checked) options[field.option] = true;
      continue;
    }
    const value = input.value.trim();
    if (value) options[field.option] = field.kind === 'number' ? Number(value) : value;
  }
  return {method, options, extra: $('launch-extra').value.trim()};
}

let commandTimer = null;
let commandRequest = 0;  // numbers the previews, so a slow answer cannot replace a newer one

function scheduleCommand() {
  clearTimeout(commandTimer);
  commandTimer = setTimeout(updateCommand, 200);
}

async function updateCommand() {
  const request = ++commandRequest;
  let command = '';
  let error = '';
  try {
    command = (await api('/api/command', launchBody())).command;
  } catch (err) {
    error = err.message;
  }
  if (request !== commandRequest) return;
  $('launch-command').textContent = command;
  showMessage($('launch-message'), error, Boolean(error));
}

function onMethodChange() {
  const method = $('launch-method').value;
  for (const field of LAUNCH_FIELDS.filter((f) => f.onlyFor)) {
    $(`${field.id}-field`).hidden = !field.onlyFor.includes(method);
  }
  scheduleCommand();
}

async function copyCommand() {
  const code = $('launch-command');
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(code.textContent);
      flashLabel($('launch-copy'), 'Copied');
      return;
    } catch {
      // Clipboard permission refused: fall through and select the text for a manual copy.
    }
  }
  const range = document.createRange();
  range.selectNodeContents(code);
  getSelection().removeAllRanges();
  getSelection().addRange(range);
}

function flashLabel(button, text) {
  const label = button.textContent;
  button.textContent = text;
  setTimeout(() => { button.textContent = label; }, 1500);
}

async function saveYaml() {
  const path = $('launch-yaml-path').value.trim();
  if (!path) {
    showMessage($('launch-message'), 'Enter the path of the YAML file to write.', true);
    return;
  }
  const body = {...launchBody(), path};
  const result = await withBusy($('launch-save-yaml'), () => call($('launch-message'), '/api/yaml', body));
  if (result) showMessage($('launch-message'), `saved to ${result.path}`);
}

async function startRun() {
  const result = await withBusy($('launch-start'), () => call($('launch-message'), '/api/launch', launchBody()));
  if (!result) return;
  watch.plotted.add(result.id);
  watch.selected = result.id;
  showTab('watch');
}

// ---------------------------------------------------------------- watch

const watch = {
  runs: new Map(),     // id -> latest entry of /api/runs
  details: new Map(),  // id -> latest /api/run answer (series, log)
  rows: new Map(),     // id -> its <tr>
  colours: new Map(),  // id -> chart colour, fixed once given
  plotted: new Set(),
  selected: null,
};

const RUN_COLUMNS = ['name', 'method', 'status', 'step', 'eta', 'tps', 'loss'];
let pollTimer = null;
let polling = false;     // a refresh is in flight
let pollFailed = false;  // the message area shows a polling error, to clear once polling works again

function pollSoon() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollWatch, 0);
}

function stopPolling() {
  clearTimeout(pollTimer);
  pollTimer = null;
}

// Refresh once, then again a second later while the Watch tab is on screen.
async function pollWatch() {
  pollTimer = null;
  if (polling) return;  // the refresh in flight schedules the next one
  polling = true;
  try {
    await refreshWatch();
  } finally {
    polling = false;
  }
  if (activeTab === 'watch' && !document.hidden && pollTimer === null) {
    pollTimer = setTimeout(pollWatch, 1000);
  }
}

async function refreshWatch() {
  const message = $('watch-message');
  try {
    const {runs} = await api('/api/runs');
    syncRuns(runs);
    const ids = new Set(watch.plotted);
    if (watch.selected) ids.add(watch.selected);
    await Promise.all([...ids].map(fetchRunDetail));
    if (pollFailed) showMessage(message, '');
    pollFailed = false;
  } catch (err) {
    showMessage(message, err.message, true);
    pollFailed = true;
  }
  drawChart();
  showSelectedRun();
}

async function fetchRunDetail(id) {
  watch.details.set(id, await api(`/api/run?id=${encodeURIComponent(id)}`));
}

// Update the table in place (rebuilding it would eat clicks on its checkboxes and buttons).
function syncRuns(runs) {
  const body = $('runs-table').tBodies[0];
  const listed = new Set();
  for (const run of runs) {
    listed.add(run.id);
    watch.runs.set(run.id, run);
    const row = watch.rows.get(run.id) || createRunRow(run.id);
    updateRunRow(row, run);
    body.append(row);  // moves an existing row: the table follows the server's order
  }
  for (const id of [...watch.rows.keys()]) {
    if (!listed.has(id)) forgetRun(id);
  }
  markRows();
}

function createRunRow(id) {
  const plot = el('input', {type: 'checkbox', className: 'run-plot', title: 'plot this run'});
  plot.addEventListener('change', () => setPlotted(id, plot.checked));
  const stop = el('button', {type: 'button', className: 'run-stop'}, 'Stop');
  stop.addEventListener('click', () => runAction('/api/stop', id));
  const resume = el('button', {type: 'button', className: 'run-resume'}, 'Resume');
  resume.addEventListener('click', () => runAction('/api/resume', id));
  const row = el('tr', {className: 'run'},
    el('td', {}, plot),
    ...RUN_COLUMNS.map((column) => el('td', {className: `run-${column}`})),
    el('td', {className: 'run-actions'}, stop, resume));
  row.dataset.id = id;
  row.addEventListener('click', (event) => {
    if (!event.target.closest('input, button')) selectRun(id);
  });
  watch.rows.set(id, row);
  return row;
}

function updateRunRow(row, run) {
  const text = {
    name: run.name,
    method: run.method,
    status: run.status,
    step: run.max_steps ? `${run.step}/${run.max_steps}` : String(run.step ?? '-'),
    eta: formatEta(run.eta_seconds),
    tps: formatNumber(run.tokens_per_second, 0),
    loss: formatNumber(run.loss, 4),
  };
  for (const column of RUN_COLUMNS) row.querySelector(`.run-${column}`).textContent = text[column];
  row.querySelector('.run-name').title = run.id;
  row.querySelector('.run-status').dataset.status = run.status;
  row.querySelector('.run-stop').disabled = !run.can_stop;
  row.querySelector('.run-resume').disabled = !run.can_resume;
}

function forgetRun(id) {
  watch.rows.get(id).remove();
  for (const store of [watch.rows, watch.runs, watch.details]) store.delete(id);
  watch.plotted.delete(id);
  if (watch.selected === id) watch.selected = null;
}

// Reflect the selection and the plotted set in the rows.
function markRows() {
  for (const [id, row] of watch.rows) {
    row.classList.toggle('selected', id === watch.selected);
    row.querySelector('.run-plot').checked = watch.plotted.has(id);
  }
}

function selectRun(id) {
  watch.selected = id;
  watch.plotted.add(id);
  markRows();
  showSelectedRun(true);
  pollSoon();
}

function setPlotted(id, plotted) {
  if (plotted) watch.plotted.add(id);
  else watch.plotted.delete(id);
  drawChart();
  if (plotted) pollSoon();  // fetch its curves now rather than at the next tick
}

async function runAction(path, id) {
  if (await call($('watch-message'), path, {id})) pollSoon();
}

// Show the selected run's command and log, keeping the log pinned to its end unless the user scrolled up.
function showSelectedRun(justSelected = false) {
  const log = $('run-log');
  const run = watch.runs.get(watch.selected);
  const detail = watch.details.get(watch.selected);
  $('run-command').textContent = run?.command || detail?.command || '';
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  const text = detail?.log || '';
  if (log.textContent !== text) log.textContent = text;
  if (justSelected || atEnd) log.scrollTop = log.scrollHeight;
}

// ---------------------------------------------------------------- chart

const SVG_NS = 'http://www.w3.org/2000/svg';
const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];
const CHART = {width: 960, legend: 30, panel: 240, left: 60, right: 20, top: 28, bottom: 30};
const METRIC_GROUPS = [
  {title: 'loss', accepts: (key) => key === 'loss' || key === 'eval_loss'},
  {title: 'reward', accepts: (key) => key.includes('reward')},
];

function svg(tag, attrs, parent, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  parent.append(node);
  return node;
}

function colourFor(id) {
  if (!watch.colours.has(id)) watch.colours.set(id, PALETTE[watch.colours.size % PALETTE.length]);
  return watch.colours.get(id);
}

function runName(id) {
  return watch.runs.get(id)?.name || id;
}

// Every (plotted run, key of the group) pair with at least one finite point.
function groupLines(group) {
  const lines = [];
  for (const id of watch.plotted) {
    const series = watch.details.get(id)?.series || {};
    for (const [key, raw] of Object.entries(series)) {
      const points = raw.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
      if (group.accepts(key) && points.length) lines.push({id, key, points});
    }
  }
  return lines;
}

function drawChart() {
  const chart = $('chart');
  const panels = METRIC_GROUPS.map((group) => ({title: group.title, lines: groupLines(group)}))
    .filter((panel) => panel.lines.length);
  const height = CHART.legend + Math.max(panels.length, 1) * CHART.panel;
  chart.setAttribute('viewBox', `0 0 ${CHART.width} ${height}`);
  chart.replaceChildren();
  if (!panels.length) {
    svg('text', {x: CHART.width / 2, y: height / 2, class: 'chart-empty', 'text-anchor': 'middle'},
      chart, 'Tick a run to plot its curves.');
    return;
  }
  const shown = new Set(panels.flatMap((panel) => panel.lines.map((line) => line.id)));
  drawLegend(chart, [...shown]);
  panels.forEach((panel, i) => drawPanel(chart, panel, CHART.legend + i * CHART.panel));
}

function drawLegend(chart, ids) {
  let x = CHART.left;
  for (const id of ids) {
    svg('rect', {x, y: 10, width: 14, height: 4, fill: colourFor(id)}, chart);
    const name = runName(id);
    svg('text', {x: x + 20, y: 16, class: 'legend'}, chart, name);
    x += 40 + name.length * 7;  // rough text width: good enough for a legend line
  }
  svg('text', {x: CHART.width - CHART.right, y: 16, class: 'legend', 'text-anchor': 'end'},
    chart, 'dashed: eval');
}

function drawPanel(chart, {title, lines}, top) {
  const box = {x0: CHART.left, x1: CHART.width - CHART.right,
    y0: top + CHART.top, y1: top + CHART.panel - CHART.bottom};
  const points = lines.flatMap((line) => line.points);
  const xDomain = extent(points.map(([x]) => x));
  const yDomain = extent(points.map(([, y]) => y), 0.05);
  const sx = scale(xDomain, [box.x0, box.x1]);
  const sy = scale(yDomain, [box.y1, box.y0]);
  const group = svg('g', {class: 'chart-panel'}, chart);
  svg('text', {x: box.x0, y: box.y0 - 10, class: 'panel-title'}, group, title);
  drawAxes(group, box, xDomain, yDomain, sx, sy);
  for (const line of lines) {
    const polyline = svg('polyline', {
      class: line.key.startsWith('eval') ? 'series eval' : 'series',
      'data-run': line.id,
      'data-key': line.key,
      'data-points': line.points.length,
      stroke: colourFor(line.id),
      points: line.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' '),
    }, group);
    svg('title', {}, polyline, `${runName(line.id)} ${line.key}`);
  }
}

function drawAxes(group, box, xDomain, yDomain, sx, sy) {
  svg('line', {x1: box.x0, y1: box.y1, x2: box.x1, y2: box.y1, class: 'axis'}, group);
  svg('line', {x1: box.x0, y1: box.y0, x2: box.x0, y2: box.y1, class: 'axis'}, group);
  for (const value of ticks(yDomain)) {
    const y = sy(value);
    svg('line', {x1: box.x0, y1: y, x2: box.x1, y2: y, class: 'grid'}, group);
    svg('text', {x: box.x0 - 6, y: y + 4, class: 'tick', 'text-anchor': 'end'}, group, String(value));
  }
  for (const value of ticks(xDomain).filter(Number.isInteger)) {  // steps are whole numbers
    const x = sx(value);
    svg('line', {x1: x, y1: box.y1, x2: x, y2: box.y1 + 4, class: 'axis'}, group);
    svg('text', {x, y: box.y1 + 18, class: 'tick', 'text-anchor': 'middle'}, group, String(value));
  }
  svg('text', {x: box.x1, y: box.y1 + 18, class: 'tick', 'text-anchor': 'end'}, group, 'step');
}

// [min, max] of `values`, widened by `margin` of the range, and never empty.
function extent(values, margin = 0) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    const pad = Math.abs(lo) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }
  const pad = (hi - lo) * margin;
  lo -= pad;
  hi += pad;
  return [lo, hi];
}

function scale([d0, d1], [r0, r1]) {
  return (value) => r0 + ((value - d0) / (d1 - d0)) * (r1 - r0);
}

// About `count` round values (1, 2 or 5 times a power of ten apart) inside [lo, hi].
function ticks([lo, hi], count = 5) {
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => raw <= s);
  const values = [];
  for (let i = Math.ceil(lo / step); i * step <= hi; i += 1) {
    values.push(Number((i * step).toPrecision(12)));  // drop float noise such as 0.30000000000000004
  }
  return values;
}

// ---------------------------------------------------------------- talk

const talk = {
  messages: [],             // the conversation as the server returned it, sent back each turn
  thinkingSupported: null,  // unknown until a model is loaded
};

function formatToolCall(toolCall) {
  const fn = toolCall.function || toolCall;
  let args = fn.arguments ?? {};
  if (typeof args === 'string') {
    try {
      args = JSON.parse(args);
    } catch {
      return `${fn.name}(${args})`;  // not JSON: show it as the model wrote it
    }
  }
  return `${fn.name}(${JSON.stringify(args, null, 2)})`;
}

function messageNode(message) {
  const node = el('div', {className: `msg ${message.role}`});
  if (message.reasoning_content) {
    node.append(el('details', {className: 'reasoning'},
      el('summary', {}, 'reasoning'), el('div', {}, message.reasoning_content)));
  }
  if (message.content) node.append(el('div', {className: 'content'}, message.content));
  for (const toolCall of message.tool_calls || []) {
    node.append(el('pre', {className: 'tool-call'}, formatToolCall(toolCall)));
  }
  return node;
}

// Draw the conversation; while waiting, also the unsent user turn and a placeholder reply.
function renderConversation(pendingUser) {
  const history = $('talk-history');
  history.replaceChildren(...talk.messages.map(messageNode));
  if (pendingUser) {
    // The placeholder is not `.assistant`, so it is never mistaken for the model's answer.
    history.append(messageNode(pendingUser), el('div', {className: 'msg pending'}, 'thinking\u2026'));
  }
  history.scrollTop = history.scrollHeight;
}

async function loadChatModel() {
  const status = $('talk-status');
  status.textContent = 'loading\u2026';
  const body = {model: $('talk-model').value.trim()};
  const result = await withBusy($('talk-load'), () => call($('talk-error'), '/api/chat/load', body));
  if (!result) {
    status.textContent = '';
    return;
  }
  talk.thinkingSupported = Boolean(result.thinking);
  const thinking = $('talk-thinking');
  thinking.disabled = !result.thinking;
  if (!result.thinking) thinking.checked = false;
  $('talk-tools').placeholder = result.tools ? '' : "this model's chat template does not take tools";
  status.textContent = `loaded ${result.model || 'embedded model'}`;
}

async function sendMessage() {
  const input = $('talk-input');
  const send = $('talk-send');
  const text = input.value.trim();
  if (!text || send.disabled) return;
  const user = {role: 'user', content: text};
  input.value = '';
  renderConversation(user);
  const body = {
    model: $('talk-model').value.trim(),
    system: $('talk-system').value,
    thinking: talk.thinkingSupported ? $('talk-thinking').checked : null,
    tools: $('talk-tools').value.trim(),
    messages: talk.messages,
    text,
  };
  const result = await withBusy(send, () => call($('talk-error'), '/api/chat', body));
  if (result) talk.messages.push(user, result.message);
  else if (!input.value) input.value = text;  // give the message back for another try
  renderConversation();
}

function resetConversation() {
  talk.messages = [];
  showMessage($('talk-error'), '');
  renderConversation();
}

// ---------------------------------------------------------------- wiring

function init() {
  for (const tab of TABS) $(`tab-${tab}`).addEventListener('click', () => showTab(tab));

  $('data-form').addEventListener('submit', (event) => {
    event.preventDefault();
    loadData();
  });

  const fields = $('launch-fields');
  fields.addEventListener('input', scheduleCommand);
  fields.addEventListener('change', scheduleCommand);
  $('launch-method').addEventListener('change', onMethodChange);
  $('launch-copy').addEventListener('click', copyCommand);
  $('launch-save-yaml').addEventListener('click', saveYaml);
  $('launch-start').addEventListener('click', startRun);

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && activeTab === 'watch') pollSoon();
  });

  $('talk-load').addEventListener('click', loadChatModel);
  $('talk-send').addEventListener('click', sendMessage);
  $('talk-reset').addEventListener('click', resetConversation);
  $('talk-input').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });

  drawChart();
  loadInfo();
}

init();
