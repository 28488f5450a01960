// The GRADIENTS tab. TensorBoard loads this module into an iframe whose base URL is data/plugin/gradients/ and
// calls render(). Everything it needs is served by the plugin itself (static/): no CDN, no build step.
//
// Layout: the health report on top, then per run (one column each, shared axes) the gradient-flow heat map and
// one chart per family with every layer on it. Colours: one per layer from viridis by depth, the output layer
// darkest and the input layer lightest: a gradient starts at the loss and fades, layer by layer, on its way to
// the input, and a vanishing gradient looks the same way on the chart.

const state = {runs: [], selected: [], views: {}, range: null, charts: [], heatmaps: {}};
window.gradients = state;  // for the browser test and the console

const VIRIDIS = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779', '#6ece58',
                 '#b5de2b'];  // stops 0 .. 0.9: the last yellow is too light on white
const MAGMA = ['#000004', '#1c1044', '#4f127b', '#812581', '#b5367a', '#e55964', '#fb8761', '#fec287',
               '#fcfdbf'];

function lerpColor(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  const a = hex(stops[i]), b = hex(stops[i + 1]);
  return a.map((v, k) => Math.round(v + f * (b[k] - v)));
}
const hex = (s) => [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16));
const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
// Layer i of n, input (0) lightest, output (n - 1) darkest.
const depthColor = (i, n) => rgb(lerpColor(VIRIDIS, n <= 1 ? 0 : 1 - i / (n - 1)));
const fmt = (v) => v == null ? '—' : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0) ?
    v.toExponential(2) : v.toPrecision(3);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else if (k.startsWith('on')) e[k] = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    document.head.append(el('script', {src, onload: resolve, onerror: reject}));
  });
}

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return r.json();
}

export async function render() {
  document.head.append(el('link', {rel: 'stylesheet', href: './static/uPlot.min.css'}),
                       el('link', {rel: 'stylesheet', href: './static/style.css'}));
  await loadScript('./static/uPlot.iife.min.js');
  document.body.append(el('div', {id: 'top'}), el('div', {id: 'report'}), el('div', {id: 'columns'}));
  state.runs = await getJSON('./runs');
  state.selected = state.runs.slice(0, 1).map((r) => r.run);
  drawRunPicker();
  await refresh();
  setInterval(refresh, 30000);  // a live run: the backend reads only the events written since the last call
}

function drawRunPicker() {
  const top = document.getElementById('top');
  top.replaceChildren(el('span', {class: 'title'}, 'runs (pick two to compare):'));
  for (const r of state.runs) {
    const box = el('input', {type: 'checkbox', 'data-run': r.run});
    box.checked = state.selected.includes(r.run);
    box.onchange = () => {
      state.selected = state.runs.map((x) => x.run).filter((name) =>
          top.querySelector(`input[data-run="${CSS.escape(name)}"]`).checked).slice(-2);
      drawRunPicker();
      state.range = null;
      refresh();
    };
    const mark = r.healthy == null ? '' : r.healthy ? ' ✓' : ' ⚠';
    top.append(el('label', {class: 'run'}, box, r.run + mark));
  }
  const reset = el('button', {id: 'reset-zoom', onclick: () => { state.range = null; refresh(); }},
                   'whole run');
  top.append(reset);
}

async function refresh() {
  const columns = document.getElementById('columns');
  const width = Math.max(300, Math.floor((columns.clientWidth || 1200) / Math.max(1, state.selected.length)) - 24);
  const q = (run) => {
    const p = new URLSearchParams({run, buckets: String(width)});
    if (state.range) { p.set('lo', state.range[0]); p.set('hi', state.range[1]); }
    return './data?' + p;
  };
  const t0 = performance.now();
  const views = await Promise.all(state.selected.map((run) => getJSON(q(run))));
  for (const v of views) for (const f of v.families) for (const s of f.series) decodeSeries(s);
  const t1 = performance.now();
  state.views = Object.fromEntries(views.map((v) => [v.run, v]));
  drawReport(views);
  drawColumns(views, width);
  state.fetchMs = t1 - t0;
  state.drawMs = performance.now() - t1;
  state.renderMs = performance.now() - t0;
  document.body.dataset.rendered = String(Date.now());
}

// The backend sends each series as base64 columns (steps float64, values float32, little-endian): arrays here,
// NaN and inf as null (a gap in the line).
function column(b64, Type) {
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Type(bytes.buffer);
}

function decodeSeries(s) {
  s.steps = Array.from(column(s.steps, Float64Array));
  s.values = Array.from(column(s.values, Float32Array), (v) => Number.isFinite(v) ? v : null);
}

function findings(view) {
  return view.health ? view.health.findings.filter((f) => f.verdict !== 'healthy') : [];
}

function drawReport(views) {
  const box = document.getElementById('report');
  box.replaceChildren();
  for (const v of views) {
    const h = v.health;
    const head = el('div', {class: 'run-head'}, el('b', {}, v.run), ` steps ${v.steps[0]}–${v.steps[1]}`,
                    v.downsampled ? el('span', {class: 'note'},
                        ` · downsampled for the screen: min and max of every ${Math.ceil(
                            (v.range[1] - v.range[0]) / v.buckets)}-step bucket, spikes kept`) : '');
    box.append(head);
    if (!h) { box.append(el('div', {class: 'note'}, 'no health report yet')); continue; }
    const source = h.source === 'provisional' ? ' (so far: the run has no health.json yet)' : '';
    const bad = findings(v);
    if (bad.length) {
      box.append(el('div', {class: 'unhealthy', 'data-run': v.run},
                    `${bad.length} finding${bad.length > 1 ? 's' : ''}${source}, marked on the charts below: ` +
                    bad.map((f) => `${f.verdict} (${f.layer})`).join('; ')));
    }
    if (h.healthy) {
      box.append(el('div', {class: 'healthy', 'data-run': v.run}, 'healthy' + source + ': ' +
                    h.findings[0].evidence));
    }
  }
}

// Aligned data for uPlot: one x array (the union of steps) and a y array per series, null where it has no point.
function align(series, log) {
  const xs = [...new Set(series.flatMap((s) => s.steps))].sort((a, b) => a - b);
  const at = new Map(xs.map((x, i) => [x, i]));
  const ys = series.map((s) => {
    const y = new Array(xs.length).fill(null);
    s.steps.forEach((x, i) => { const v = s.values[i]; y[at.get(x)] = log && !(v > 0) ? null : v; });
    return y;
  });
  return [xs, ...ys];
}

function sharedRanges(views) {
  // One y range per family over all columns, one x range for all: side-by-side runs read on the same axes.
  const y = {};
  let xmin = Infinity, xmax = -Infinity;
  for (const v of views) {
    xmin = Math.min(xmin, v.range[0]); xmax = Math.max(xmax, v.range[1]);
    for (const f of v.families) {
      for (const s of f.series) {
        for (const val of s.values) {
          if (val == null || (f.log && !(val > 0))) continue;
          const r = y[f.key] || (y[f.key] = [Infinity, -Infinity]);
          r[0] = Math.min(r[0], val); r[1] = Math.max(r[1], val);
        }
      }
    }
  }
  return {x: [xmin, xmax === xmin ? xmin + 1 : xmax], y};
}

// One row per family, one cell per run: side-by-side charts line up, on the same axes.
function drawColumns(views, width) {
  for (const c of state.charts) c.destroy();
  state.charts = [];
  state.heatmaps = {};
  const columns = document.getElementById('columns');
  columns.replaceChildren();
  const shared = sharedRanges(views);
  const keys = [...new Set(views.flatMap((v) => v.families.map((f) => f.key)))];
  const order = views.length ? views[0].families.map((f) => f.key) : [];
  keys.sort((a, b) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99));
  const row = (key) => {
    const r = el('div', {class: 'row', 'data-family': key});
    columns.append(r);
    return r;
  };
  const heat = row('heatmap');
  for (const v of views) {
    const grad = v.families.find((f) => f.key === 'grad_norm');
    heat.append(el('div', {class: 'column', 'data-run': v.run}, grad ? heatmap(v, grad, width, shared.y.grad_norm) : ''));
  }
  for (const key of keys) {
    const r = row(key);
    for (const v of views) {
      const fam = v.families.find((f) => f.key === key);
      r.append(el('div', {class: 'column', 'data-run': v.run}, fam ? chart(v, fam, width, shared) : ''));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Charts

function chart(view, fam, width, shared) {
  const n = fam.series.length;
  const color = (i) => fam.depth ? depthColor(i, n) : ['#1f77b4', '#d62728'][i % 2];
  const data = align(fam.series, fam.log);
  const box = el('div', {class: 'chart', 'data-family': fam.key});
  const name = el('span', {class: 'hovered'});
  box.append(el('div', {class: 'chart-title'}, fam.title + (fam.log ? ' (log axis)' : ''), name));
  const marks = findings(view).filter((f) => (view.verdict_charts[f.verdict] || []).includes(fam.key));
  const band = fam.key === 'update_ratio' ? view.band : null;
  const yr = shared.y[fam.key];
  const opts = {
    width, height: 220,
    legend: {show: false},
    cursor: {focus: {prox: 16}, drag: {x: true, y: false}},
    focus: {alpha: 0.15},
    scales: {
      x: {time: false, range: () => state.range || shared.x},
      y: fam.log ? {distr: 3, range: yr && yr[0] < Infinity ? () => logRange(yr, band) : undefined}
                 : {range: yr && yr[0] < Infinity ? () => linRange(yr) : undefined},
    },
    axes: [{label: 'step', size: 40}, {size: 60, values: (u, ticks) => ticks.map(fam.log ? logTick : fmt)}],
    series: [{label: 'step'}, ...fam.series.map((s, i) => ({
      label: s.layer, stroke: color(i), width: 1.5, spanGaps: true, points: {show: false},
    }))],
    hooks: {
      drawClear: [(u) => drawBands(u, band, marks)],
      setSeries: [(u, i) => { name.textContent = i == null ? '' : ` · ${u.series[i].label}`; }],
      setSelect: [(u) => zoomFromSelect(u)],
    },
  };
  const u = new uPlot(opts, data, box);
  u.family = fam.key;
  u.run = view.run;
  state.charts.push(u);
  box.append(legend(u, fam, color));
  for (const f of marks) {
    box.append(el('div', {class: 'verdict', 'data-verdict': f.verdict, 'data-layer': f.layer},
                  el('b', {}, `${f.verdict}: ${f.layer}, steps ${f.steps[0]}–${f.steps[1]}. `),
                  f.evidence, el('div', {class: 'fix'}, 'fix: ' + f.fix)));
  }
  return box;
}

// 1e-5, 0.01, 0.1, 1, 10, 100, 1e4: powers of ten as a reader writes them
function logTick(v) {
  if (!(v > 0)) return '';
  const e = Math.round(Math.log10(v));
  if (Math.abs(v / 10 ** e - 1) > 1e-6) return '';  // the minor ticks between: lines only
  return e >= -2 && e <= 3 ? String(+v.toFixed(Math.max(0, -e))) : `1e${e}`;
}

function logRange(yr, band) {
  let [lo, hi] = yr;
  if (band) { lo = Math.min(lo, band[0]); hi = Math.max(hi, band[1]); }
  return [10 ** Math.floor(Math.log10(lo)), 10 ** Math.ceil(Math.log10(hi) + 1e-9)];
}

function linRange([lo, hi]) {
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
  return [lo - pad, hi + pad];
}

// Shaded under the lines: the healthy update-ratio band, and each verdict's step range in red.
function drawBands(u, band, marks) {
  const ctx = u.ctx, {left, top, width, height} = u.bbox;
  ctx.save();
  if (band) {
    const y0 = u.valToPos(band[1], 'y', true), y1 = u.valToPos(band[0], 'y', true);
    ctx.fillStyle = 'rgba(46, 160, 67, 0.12)';
    ctx.fillRect(left, Math.max(top, y0), width, Math.min(top + height, y1) - Math.max(top, y0));
  }
  for (const f of marks) {
    let x0 = u.valToPos(f.steps[0], 'x', true), x1 = u.valToPos(f.steps[1], 'x', true);
    x0 = Math.max(left, x0); x1 = Math.min(left + width, Math.max(x1, x0 + 3));
    ctx.fillStyle = 'rgba(214, 39, 40, 0.10)';
    ctx.fillRect(x0, top, x1 - x0, height);
    ctx.fillStyle = 'rgba(214, 39, 40, 0.9)';
    ctx.fillRect(x0, top, x1 - x0, 4);
  }
  ctx.restore();
}

// The legend: layers in depth order, input first. Hover highlights the layer's line, a click isolates it (and a
// second click brings every layer back).
function legend(u, fam, color) {
  const box = el('div', {class: 'legend'});
  fam.series.forEach((s, k) => {
    const i = k + 1;
    const item = el('span', {class: 'item', 'data-layer': s.layer, 'data-color': color(k)},
                    el('i', {style: `background:${color(k)}`}), s.layer);
    item.onmouseenter = () => u.setSeries(i, {focus: true});
    item.onmouseleave = () => u.setSeries(null, {focus: false});
    item.onclick = () => {
      const alone = u.series.every((ser, j) => j === 0 || (j === i) === ser.show);
      u.series.forEach((ser, j) => { if (j > 0) u.setSeries(j, {show: alone || j === i}); });
      box.querySelectorAll('.item').forEach((e, j) => e.classList.toggle('off', !(alone || j === k)));
    };
    box.append(item);
  });
  return box;
}

function zoomFromSelect(u) {
  if (u.select.width < 3) return;
  const lo = u.posToVal(u.select.left, 'x'), hi = u.posToVal(u.select.left + u.select.width, 'x');
  u.setSelect({left: 0, width: 0, top: 0, height: 0}, false);
  zoomTo(Math.floor(lo), Math.ceil(hi));
}

// A step range zooms every chart of the tab and fetches that range again at full resolution for the width.
function zoomTo(lo, hi) {
  state.range = [lo, Math.max(hi, lo + 1)];
  refresh();
}

// ---------------------------------------------------------------------------------------------------------------
// The gradient-flow heat map: layers (input on top) x step buckets, log colour; hover names layer, step, value.

function heatmap(view, fam, width, range) {
  const rows = fam.series.length;
  const [lo, hi] = state.range || view.range;
  const cols = Math.max(1, Math.min(width - 130, 1000, hi - lo + 1));  // a column per step while they fit
  const span = hi - lo + 1;
  // cell = the largest norm logged in its columns' steps (a spike stays visible), with its step; a column between
  // two logging steps shows the earlier one's value
  const cells = fam.series.map((s) => {
    const row = new Array(cols).fill(null);
    s.steps.forEach((x, i) => {
      const v = s.values[i];
      if (v == null || !(v > 0) || x < lo || x > hi) return;
      const c = Math.min(cols - 1, Math.floor((x - lo) / span * cols));
      if (row[c] == null || v > row[c].v) row[c] = {v, step: x};
    });
    const last = row.findLastIndex((c) => c != null);
    for (let k = 1; k < last; k++) if (row[k] == null) row[k] = row[k - 1];
    return row;
  });
  // the colour scale: shared by the runs shown side by side (their grad_norm charts' y range)
  let [vmin, vmax] = range && range[0] < Infinity ? range : [Infinity, -Infinity];
  if (!range) for (const row of cells) for (const c of row) if (c) { vmin = Math.min(vmin, c.v); vmax = Math.max(vmax, c.v); }
  const lmin = Math.log10(vmin), lrange = Math.max(1e-12, Math.log10(vmax) - lmin);
  const rowH = Math.max(3, Math.min(18, Math.floor(360 / rows)));
  const canvas = el('canvas', {width: cols, height: rows * rowH, class: 'heat',
                               style: `width:${width - 130}px;height:${rows * rowH}px`});
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(cols, rows * rowH);
  cells.forEach((row, r) => row.forEach((c, k) => {
    const col = c ? lerpColor(MAGMA, (Math.log10(c.v) - lmin) / lrange) : [235, 235, 235];
    for (let y = r * rowH; y < (r + 1) * rowH; y++) {
      const p = (y * cols + k) * 4;
      img.data[p] = col[0]; img.data[p + 1] = col[1]; img.data[p + 2] = col[2]; img.data[p + 3] = 255;
    }
  }));
  ctx.putImageData(img, 0, 0);
  const labels = el('div', {class: 'heat-labels', style: `height:${rows * rowH}px`});
  fam.series.forEach((s) => labels.append(el('div', {style: `height:${rowH}px;line-height:${rowH}px`},
                                             rowH >= 9 ? s.layer : '')));
  const tip = el('div', {class: 'tooltip', id: `tip-${view.run}`});
  const sel = el('div', {class: 'heat-select'});
  const wrap = el('div', {class: 'heat-wrap'}, canvas, sel, tip);
  const cellAt = (ev) => {
    const rect = canvas.getBoundingClientRect();
    const k = Math.floor((ev.clientX - rect.left) / rect.width * cols);
    const r = Math.floor((ev.clientY - rect.top) / rect.height * rows);
    return {k: Math.max(0, Math.min(cols - 1, k)), r: Math.max(0, Math.min(rows - 1, r)), x: ev.clientX - rect.left};
  };
  let dragFrom = null;
  canvas.onmousemove = (ev) => {
    const {k, r, x} = cellAt(ev);
    const c = cells[r][k];
    tip.dataset.layer = fam.series[r].layer;
    tip.dataset.value = c ? String(c.v) : '';
    tip.dataset.step = c ? String(c.step) : '';
    tip.replaceChildren(el('b', {}, fam.series[r].layer),
                        c ? ` · step ${c.step} · grad norm ${fmt(c.v)}` : ' · not logged here');
    tip.style.display = 'block';
    tip.style.left = `${Math.max(0, Math.min(x + 12, width - 130 - 260))}px`;
    tip.style.top = `${(r + 1) * rowH + 4}px`;
    if (dragFrom != null) {
      sel.style.left = `${Math.min(dragFrom, x)}px`; sel.style.width = `${Math.abs(x - dragFrom)}px`;
      sel.style.display = 'block';
    }
  };
  canvas.onmouseleave = () => { tip.style.display = 'none'; };
  canvas.onmousedown = (ev) => { dragFrom = cellAt(ev).x; };
  canvas.onmouseup = (ev) => {
    const x = cellAt(ev).x, from = dragFrom;
    dragFrom = null; sel.style.display = 'none';
    const w = canvas.getBoundingClientRect().width;
    if (from == null || Math.abs(x - from) < 4) return;
    zoomTo(Math.floor(lo + Math.min(from, x) / w * span), Math.floor(lo + Math.max(from, x) / w * span));
  };
  state.heatmaps[view.run] = {cells, layers: fam.series.map((s) => s.layer), rows, cols, rowH};
  const scale = el('div', {class: 'heat-scale'},
                   `colour: log10 gradient norm, ${fmt(vmin)} (dark) to ${fmt(vmax)} (light); ` +
                   'drag across to zoom every chart to those steps');
  return el('div', {class: 'heatmap', 'data-run': view.run},
            el('div', {class: 'chart-title'}, 'gradient flow: gradient norm per layer (input on top) over the steps'),
            el('div', {class: 'heat-row'}, labels, wrap), scale);
}
