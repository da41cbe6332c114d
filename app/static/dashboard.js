/* The datadiet dashboard: polls the API's read endpoints every POLL_MS and draws them (uPlot for charts).
 *
 * Data, all from public endpoints (shared/CONTRACT.md):
 *   GET /v1/stats                          buffer size and counters (the ingest rate is computed here), the
 *                                          trainer's step, speed and last validation loss
 *   GET /v1/weights                        live source weights, the weight histogram, the effective fraction
 *   GET /v1/weights/history?limit=         the weight snapshots recorded with each checkpoint (newest first)
 *   GET /v1/checkpoints?limit=             the checkpoint list (and val_loss by step from its metrics)
 *   GET /v1/weights/samples?order=asc|desc the lowest / highest weighted samples, then
 *   GET /v1/samples/{id}                   each one's content (admin scope; samples never change, so cached)
 *   GET /v1/quarantine?limit=              samples the trainer set aside, with their reasons
 * The history endpoints are read again only when a new checkpoint appears (snapshots come with them).
 *
 * Sample content is untrusted agent data: it is only ever written with textContent (never innerHTML), and
 * the page's Content-Security-Policy (app/routes/dashboard.py) forbids any script but this file and uPlot.
 * With API keys configured, the key the user pastes is kept in sessionStorage (this tab only) and sent as
 * "Authorization: Bearer <key>".
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  const KEY_STORAGE = "datadiet.apiKey";
  const TABLE_ROWS = 8; // lowest / highest weighted samples shown
  const TABLE_CHECKPOINTS = 20;
  const TABLE_QUARANTINE = 10;
  const HISTORY_LIMIT = 1000; // snapshots and checkpoints read for the charts
  const LIVE_POINTS = 2000; // live points kept per chart (older ones are dropped)
  const RATE_WINDOW_S = 10; // the ingest rate is the mean over this many seconds
  const PALETTE = ["#2f6fde", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0c8599", "#e67700",
    "#5c940d", "#ae3ec9", "#1098ad"];

  const $ = (id) => document.getElementById(id);

  // --- state -------------------------------------------------------------------------------------------

  const state = {
    weightsByStep: new Map(), // step -> {sources: {name: w}, effective: f}
    lossByStep: new Map(), // step -> validation loss
    buffer: { t: [], size: [], rate: [] }, // readings since the page opened (t in unix seconds)
    ingested: [], // [t, ingested] within RATE_WINDOW_S, for the rate
    colors: new Map(), // source -> colour, stable for the page's life
    content: new Map(), // sample id -> {sample} | {missing: reason}
    newestCheckpoint: undefined, // the newest version seen: history is re-read when it changes
    signatures: new Map(), // table id -> what it was last drawn from (redraw only on change)
    refreshes: 0,
  };

  // --- the API ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail, path) {
      super(`${path}: ${status} ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** GET a path relative to the page (so a reverse proxy may serve it under a prefix); JSON, or ApiError
   * with the contract's {"error": {"detail"}} when there is one. */
  async function api(path) {
    const response = await fetch(path, {
      headers: { Accept: "application/json", ...authHeaders() },
      cache: "no-store",
    });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).error.detail || detail;
      } catch (_) {
        /* not the contract's JSON error: keep the status text */
      }
      throw new ApiError(response.status, detail, path);
    }
    return response.json();
  }

  // --- formatting ----------------------------------------------------------------------------------------

  const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const fmtNum = (x, digits = 3) => (x === null || x === undefined ? "–" : String(Number(x.toPrecision(digits))));
  const fmtPct = (f) => `${(100 * f).toFixed(1)}%`;
  const fmtPctTick = (f) => `${Number((100 * f).toFixed(1))}%`;
  const fmtEdge = (x) => fmtNum(x).replace(/^0\./, "."); // "0.25" -> ".25": short bin labels
  const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "short", timeStyle: "medium" }) : "–");

  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });

  function fmtBytes(n) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  }

  /** A sample's input or target as plain text: a string as is, a vector shortened, a conversation as
   * "role: content" lines. */
  function describe(value) {
    if (value === undefined || value === null) return "";
    if (typeof value === "string") return value;
    if (typeof value === "number") return String(value);
    if (Array.isArray(value)) {
      if (value.every((v) => typeof v === "number")) {
        const head = value.slice(0, 6).map((v) => fmtNum(v)).join(", ");
        return `[${head}${value.length > 6 ? ", …" : ""}] (${value.length} values)`;
      }
      if (value.every((m) => m && typeof m === "object" && "role" in m)) {
        return value.map((m) => `${m.role}: ${typeof m.content === "string" ? m.content : JSON.stringify(m.content)}`).join("\n");
      }
    }
    return JSON.stringify(value);
  }

  const truncate = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);

  function colorOf(source) {
    if (!state.colors.has(source)) {
      const i = state.colors.size;
      // past the palette: spread hues by the golden angle
      state.colors.set(source, i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 137.5) % 360}, 60%, 45%)`);
    }
    return state.colors.get(source);
  }

  // --- DOM helpers (text only: nothing here parses HTML) ---------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function td(text, className) {
    return el("td", className, text);
  }

  function contentCell(text, unavailable) {
    const cell = el("td");
    const div = el("div", unavailable ? "content unavailable" : "content", truncate(text, 400));
    div.title = truncate(text, 4000);
    cell.append(div);
    return cell;
  }

  function sourceCell(source) {
    const cell = el("td");
    if (source === null || source === undefined) return cell;
    const tag = el("span", "source-tag", source);
    tag.style.color = colorOf(source);
    cell.append(tag);
    return cell;
  }

  /** Redraw a table's rows from ``rows`` (built by ``build``) only when ``signature`` changed, so a
   * selection or a hover survives refreshes that bring nothing new. */
  function fillTable(id, signature, rows, build) {
    if (state.signatures.get(id) === signature) return;
    state.signatures.set(id, signature);
    const body = $(id).querySelector("tbody");
    body.replaceChildren(...rows.map(build));
    $(id).hidden = rows.length === 0;
    $(`${id}-empty`).hidden = rows.length > 0;
  }

  function setText(id, text) {
    $(id).textContent = text;
  }

  // --- charts ---------------------------------------------------------------------------------------------

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function axis(extra) {
    return { stroke: cssVar("--muted"), grid: { stroke: cssVar("--line"), width: 1 },
      ticks: { stroke: cssVar("--line"), width: 1 }, ...extra };
  }

  /** One uPlot chart in the element ``id``: made on first data (and again when its series change, named
   * by ``layout``), resized with its card; ``data-points`` on the element counts the points drawn. */
  class Chart {
    constructor(id, height, makeOptions) {
      this.el = $(id);
      this.empty = $(`${id}-empty`);
      this.height = height;
      this.makeOptions = makeOptions;
      this.plot = null;
      this.layout = null;
      new ResizeObserver(() => this.resize()).observe(this.el.parentElement);
    }

    update(data, layout, points) {
      this.el.dataset.points = String(points);
      this.el.parentElement.classList.toggle("chart-empty", points === 0);
      this.empty.hidden = points > 0;
      if (points === 0) return;
      if (this.plot && this.layout === layout) {
        this.plot.setData(data);
        return;
      }
      if (this.plot) this.plot.destroy();
      const options = { width: this.width(), height: this.height, ...this.makeOptions() };
      this.plot = new uPlot(options, data, this.el);
      this.layout = layout;
    }

    width() {
      return Math.max(200, this.el.clientWidth || this.el.parentElement.clientWidth - 32);
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: this.width(), height: this.height });
    }
  }

  const stepAxis = () => axis({ label: "step", labelSize: 18, size: 36 });

  let sourceNames = [];
  const sourcesChart = new Chart("chart-sources", 250, () => ({
    scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(0.05, max * 1.1)] } },
    axes: [stepAxis(), axis({ values: (u, ticks) => ticks.map(fmtPctTick), size: 50 })],
    series: [
      { label: "step" },
      ...sourceNames.map((name) => ({
        label: name, stroke: colorOf(name), width: 2, spanGaps: true,
        value: (u, v) => (v === null ? "–" : fmtPct(v)),
      })),
    ],
  }));

  const lossChart = new Chart("chart-loss", 220, () => ({
    scales: { x: { time: false } },
    axes: [stepAxis(), axis({ size: 50 })],
    series: [{ label: "step" }, { label: "validation loss", stroke: "#c2372d", width: 2, spanGaps: true,
      points: { size: 6 }, value: (u, v) => (v === null ? "–" : fmtNum(v, 4)) }],
  }));

  let histogramLabels = [];
  const histogramChart = new Chart("chart-histogram", 220, () => ({
    scales: {
      x: { time: false, range: () => [-0.5, histogramLabels.length - 0.5] },
      y: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] },
    },
    axes: [
      axis({ splits: () => histogramLabels.map((_, i) => i), values: (u, ticks) => ticks.map((i) => histogramLabels[i] || ""),
        grid: { show: false }, label: "weight", labelSize: 18, size: 36 }),
      axis({ size: 50 }),
    ],
    series: [
      { label: "bin", value: (u, i) => (i === null ? "–" : histogramLabels[i]) },
      { label: "samples", stroke: cssVar("--accent"), fill: `${cssVar("--accent")}99`, width: 1,
        paths: uPlot.paths.bars({ size: [0.8, 80] }), points: { show: false }, value: (u, v) => fmtInt(v) },
    ],
  }));

  const effectiveChart = new Chart("chart-effective", 220, () => ({
    scales: { x: { time: false }, y: { range: () => [0, 1] } },
    axes: [stepAxis(), axis({ values: (u, ticks) => ticks.map(fmtPctTick), size: 50 })],
    series: [{ label: "step" }, { label: "effective fraction", stroke: "#2b8a3e", fill: "#2b8a3e22", width: 2,
      spanGaps: true, value: (u, v) => (v === null ? "–" : fmtPct(v)) }],
  }));

  const bufferChart = new Chart("chart-buffer", 220, () => ({
    // from the first reading, at least 30 s across: the line grows from the left as readings come
    scales: { x: { time: true, range: (u, min, max) => [min, Math.max(max, min + 30)] }, size: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] },
      rate: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] } },
    axes: [axis({ space: 70, values: (u, ticks) => ticks.map(clock) }), axis({ scale: "size", size: 56 }),
      axis({ scale: "rate", side: 1, grid: { show: false }, size: 50 })],
    series: [
      {},
      { label: "buffer size", scale: "size", stroke: "#2f6fde", width: 2, value: (u, v) => fmtInt(v) },
      { label: "ingest rate (/s)", scale: "rate", stroke: "#e8590c", width: 2, spanGaps: true,
        value: (u, v) => (v === null ? "–" : fmtNum(v)) },
    ],
  }));

  function keepLast(map, n) {
    while (map.size > n) map.delete(map.keys().next().value);
  }

  function drawWeightCharts() {
    const steps = [...state.weightsByStep.keys()].sort((a, b) => a - b);
    const names = new Set();
    for (const step of steps) for (const name of Object.keys(state.weightsByStep.get(step).sources)) names.add(name);
    sourceNames = [...names].sort();
    sourceNames.forEach(colorOf);
    const data = [steps, ...sourceNames.map((name) => steps.map((s) => state.weightsByStep.get(s).sources[name] ?? null))];
    sourcesChart.update(data, sourceNames.join("\n"), sourceNames.length ? steps.length : 0);

    const effective = steps.map((s) => state.weightsByStep.get(s).effective ?? null);
    const withValue = effective.filter((v) => v !== null).length;
    effectiveChart.update([steps, effective], "effective", withValue);
  }

  function drawLossChart() {
    const steps = [...state.lossByStep.keys()].sort((a, b) => a - b);
    lossChart.update([steps, steps.map((s) => state.lossByStep.get(s))], "loss", steps.length);
  }

  // --- each part of the page ---------------------------------------------------------------------------------

  function showStats(stats) {
    const b = stats.buffer;
    const t = stats.trainer;
    const now = Date.now() / 1000;
    setText("kpi-buffer", fmtInt(b.size));
    setText("kpi-buffer-sub", `of ${fmtInt(b.capacity)} · ${fmtInt(b.evicted)} evicted`);
    setText("kpi-quarantined", fmtInt(b.quarantined));

    state.ingested.push([now, b.ingested]);
    while (state.ingested.length > 2 && now - state.ingested[0][0] > RATE_WINDOW_S) state.ingested.shift();
    const [t0, n0] = state.ingested[0];
    const rate = state.ingested.length > 1 && now > t0 ? (b.ingested - n0) / (now - t0) : null;
    setText("kpi-rate", rate === null ? "–" : fmtNum(rate));
    setText("kpi-rate-sub", `samples / s · ${fmtInt(b.ingested)} in all`);
    $("kpi-rate-sub").title = `${fmtInt(b.ingested)} ingested, ${fmtInt(b.duplicates)} duplicates, ${fmtInt(b.evicted)} evicted`;

    const buf = state.buffer;
    buf.t.push(now);
    buf.size.push(b.size);
    buf.rate.push(rate);
    if (buf.t.length > LIVE_POINTS) for (const k of ["t", "size", "rate"]) buf[k].shift();
    // drawn from the second reading on: one point has no time axis to speak of
    bufferChart.update([buf.t, buf.size, buf.rate], "buffer", buf.t.length > 1 ? buf.t.length : 0);

    setText("kpi-step", fmtInt(t.step));
    setText("kpi-step-sub", t.step === null ? "the trainer has not reported" : `${t.steps_per_s === null ? "–" : fmtNum(t.steps_per_s)} steps / s`);
    setText("kpi-loss", t.val_loss === null ? "–" : fmtNum(t.val_loss, 4));
    setText("kpi-loss-sub", t.val_loss === null ? "no measurement yet" : `at step ${fmtInt(t.step)}`);
    if (t.val_loss !== null && t.step !== null) {
      state.lossByStep.set(t.step, t.val_loss);
      keepLast(state.lossByStep, LIVE_POINTS);
    }
  }

  function showWeights(doc) {
    const s = doc.summary;
    setText("kpi-effective", s.count ? fmtPct(s.effective_fraction) : "–");
    $("kpi-effective-bar").style.width = fmtPct(s.count ? s.effective_fraction : 0);
    setText("kpi-effective-sub", `of ${fmtInt(s.count)} weigh ≥ 0.1`);

    const edges = s.histogram.edges;
    const counts = s.histogram.counts;
    histogramLabels = counts.map((_, i) => (i === counts.length - 1 ? `≥${fmtEdge(edges[i])}` : `${fmtEdge(edges[i])}–${fmtEdge(edges[i + 1])}`));
    const total = counts.reduce((a, c) => a + c, 0);
    histogramChart.update([counts.map((_, i) => i), counts], histogramLabels.join("|"), total > 0 ? counts.length : 0);

    if (doc.updated_at !== null && Object.keys(doc.sources).length) {
      state.weightsByStep.set(doc.step, { sources: doc.sources, effective: s.effective_fraction });
      keepLast(state.weightsByStep, LIVE_POINTS);
    }
    Object.keys(doc.sources).sort().forEach(colorOf); // colours by name order: the same on every load
    showSourceChips(doc.sources);
  }

  function showSourceChips(sources) {
    const box = $("source-chips");
    const names = Object.keys(sources).sort((a, b) => sources[b] - sources[a]);
    const signature = JSON.stringify(names.map((n) => [n, sources[n]]));
    if (box.dataset.signature === signature) return;
    box.dataset.signature = signature;
    box.replaceChildren(...names.map((name) => {
      const chip = el("span", "chip");
      const dot = el("span", "dot");
      dot.style.background = colorOf(name);
      chip.append(dot, el("span", "name", name), el("span", "share", fmtPct(sources[name])));
      chip.dataset.source = name;
      return chip;
    }));
  }

  function showHistory(history, checkpoints) {
    for (const snap of history.snapshots) Object.keys(snap.sources).sort().forEach(colorOf);
    for (const snap of history.snapshots) {
      state.weightsByStep.set(snap.step, {
        sources: snap.sources,
        effective: snap.summary && typeof snap.summary.effective_fraction === "number" ? snap.summary.effective_fraction : null,
      });
    }
    for (const c of checkpoints) {
      const loss = c.metrics && c.metrics.val_loss;
      if (typeof loss === "number" && Number.isFinite(loss)) state.lossByStep.set(c.step, loss);
    }
  }

  async function contentOf(ids) {
    const wanted = ids.filter((id) => !state.content.has(id));
    await Promise.all(wanted.map(async (id) => {
      try {
        state.content.set(id, { sample: await api(`v1/samples/${encodeURIComponent(id)}`) });
      } catch (e) {
        if (e.status === 403) state.content.set(id, { missing: "content needs a key with the admin scope" });
        else if (e.status === 404) state.content.set(id, { missing: "no longer in the buffer" });
        // anything else (a timeout, a 503): not cached, asked again next time
      }
    }));
    if (state.content.size > 2000) state.content.clear(); // samples leave the lists; forget old content
  }

  async function showRanked(id, ranked) {
    const ids = Object.keys(ranked.weights);
    await contentOf(ids);
    const rows = ids.map((sid) => ({ id: sid, weight: ranked.weights[sid], source: ranked.sources ? ranked.sources[sid] : null,
      content: state.content.get(sid) || { missing: "content not loaded yet" } }));
    fillTable(id, JSON.stringify(rows), rows, (r) => {
      const tr = el("tr");
      const cell = el("td", "num");
      const wrap = el("div", "weight-cell");
      const bar = el("div", "weight-bar");
      // one scale for both tables: 1 (uniform) is a quarter of the bar, 4 and above all of it
      bar.style.width = `${Math.max(1, Math.round(48 * Math.min(1, r.weight / 4)))}px`;
      wrap.append(bar, el("span", null, fmtNum(r.weight)));
      cell.append(wrap);
      const idCell = td(r.id, "id");
      idCell.title = r.id;
      tr.append(cell, sourceCell(r.source), idCell);
      if (r.content.sample) {
        tr.append(contentCell(describe(r.content.sample.input)), contentCell(describe(r.content.sample.target)));
      } else {
        const missing = contentCell(r.content.missing, true);
        missing.colSpan = 2;
        tr.append(missing);
      }
      return tr;
    });
  }

  function showQuarantine(q) {
    fillTable("table-quarantine", JSON.stringify(q.samples), q.samples, (s) => {
      const tr = el("tr");
      const idCell = td(s.id, "id");
      idCell.title = s.id;
      const when = td(fmtTime(s.quarantined_at), "num");
      when.title = `step ${s.step}`;
      tr.append(when, sourceCell(s.source), idCell, contentCell(s.reason));
      if (s.sample) {
        tr.append(contentCell(describe(s.sample.input)), contentCell(describe(s.sample.target)));
      } else { // the API sends what agents posted to admin keys only
        const missing = contentCell("content needs a key with the admin scope", true);
        missing.colSpan = 2;
        tr.append(missing);
      }
      return tr;
    });
  }

  function downloadLink(c) {
    const a = el("a", "download", "download");
    a.title = `datadiet-v${c.version}.safetensors, ${fmtBytes(c.size)}`;
    a.href = `v1/checkpoints/${c.version}/file`;
    a.setAttribute("download", `datadiet-v${c.version}.safetensors`);
    // a plain link cannot send the key: with one set, fetch the file with it and save what came back
    a.addEventListener("click", async (event) => {
      if (!apiKey()) return;
      event.preventDefault();
      const label = a.textContent;
      a.textContent = "downloading…";
      try {
        const response = await fetch(a.href, { headers: authHeaders() });
        if (!response.ok) throw new ApiError(response.status, response.statusText, a.href);
        const url = URL.createObjectURL(await response.blob());
        const save = document.createElement("a");
        save.href = url;
        save.download = `datadiet-v${c.version}.safetensors`;
        save.click();
        setTimeout(() => URL.revokeObjectURL(url), 60_000);
      } catch (e) {
        showNotice(`Download of checkpoint ${c.version} failed: ${e.message}`);
      } finally {
        a.textContent = label;
      }
    });
    return a;
  }

  function showCheckpoints(list) {
    const rows = list.slice(0, TABLE_CHECKPOINTS);
    fillTable("table-checkpoints", JSON.stringify(rows), rows, (c) => {
      const tr = el("tr");
      const loss = c.metrics && typeof c.metrics.val_loss === "number" ? fmtNum(c.metrics.val_loss, 4) : "–";
      const sha = td(c.sha256.slice(0, 12), "sha");
      sha.title = c.sha256;
      const link = el("td");
      link.append(downloadLink(c));
      tr.append(td(`v${c.version}`, "num"), td(fmtInt(c.step), "num"), td(fmtTime(c.created_at), "num"),
        td(loss, "num"), td(fmtBytes(c.size), "num"), sha, link);
      return tr;
    });
  }

  // --- status, key, loop ---------------------------------------------------------------------------------------

  function showNotice(text) {
    const notice = $("notice");
    notice.textContent = text || "";
    notice.hidden = !text;
  }

  function setStatus(kind, text) {
    const status = $("status");
    status.dataset.state = kind;
    status.textContent = text;
  }

  function explain(error) {
    if (error.status === 401) {
      return apiKey()
        ? `The server refused this API key (${error.detail}). Paste a key with the read scope above.`
        : "This server needs an API key: paste a key with the read scope above.";
    }
    if (error.status === 403) return `This API key cannot read the dashboard's data (${error.detail}).`;
    if (error.status) return `The API answered ${error.status}: ${error.detail}`;
    return `The API cannot be reached (${error.message}); retrying every ${POLL_MS / 1000} s.`;
  }

  async function refresh() {
    const calls = {
      stats: api("v1/stats"),
      weights: api("v1/weights"),
      lowest: api(`v1/weights/samples?order=asc&limit=${TABLE_ROWS}`),
      highest: api(`v1/weights/samples?order=desc&limit=${TABLE_ROWS}`),
      checkpoints: api(`v1/checkpoints?limit=${TABLE_CHECKPOINTS}`),
      quarantine: api(`v1/quarantine?limit=${TABLE_QUARANTINE}`),
    };
    const names = Object.keys(calls);
    const settled = await Promise.allSettled(Object.values(calls));
    const got = {};
    const errors = [];
    settled.forEach((r, i) => {
      if (r.status === "fulfilled") got[names[i]] = r.value;
      else errors.push(r.reason);
    });

    if (got.checkpoints) {
      const newest = got.checkpoints.length ? got.checkpoints[0].version : null;
      if (newest !== state.newestCheckpoint) {
        try {
          const [history, all] = await Promise.all([api(`v1/weights/history?limit=${HISTORY_LIMIT}`),
            api(`v1/checkpoints?limit=${HISTORY_LIMIT}`)]);
          showHistory(history, all);
          state.newestCheckpoint = newest;
        } catch (e) {
          errors.push(e);
        }
      }
      showCheckpoints(got.checkpoints);
    }
    if (got.stats) showStats(got.stats);
    if (got.weights) showWeights(got.weights);
    drawWeightCharts();
    drawLossChart();
    const tables = [];
    if (got.lowest) tables.push(showRanked("table-lowest", got.lowest));
    if (got.highest) tables.push(showRanked("table-highest", got.highest));
    await Promise.all(tables);
    if (got.quarantine) showQuarantine(got.quarantine);

    if (errors.length) {
      const first = errors.find((e) => e.status === 401 || e.status === 403) || errors[0];
      setStatus(first.status === 401 || first.status === 403 ? "auth" : "error", first.status === 401 ? "needs an API key" : "error");
      showNotice(explain(first));
    } else {
      const step = got.stats && got.stats.trainer.step !== null ? ` · step ${fmtInt(got.stats.trainer.step)}` : "";
      setStatus("live", `live · ${new Date().toLocaleTimeString()}${step}`);
      showNotice("");
    }
    state.refreshes += 1;
    document.documentElement.dataset.refreshes = String(state.refreshes);
  }

  let timer = null;
  let running = false;

  async function tick() {
    clearTimeout(timer);
    if (running) return;
    running = true;
    try {
      if (!document.hidden) await refresh();
    } catch (e) {
      setStatus("error", "error");
      showNotice(`The dashboard failed to draw: ${e.message}`);
    } finally {
      running = false;
      timer = setTimeout(tick, POLL_MS);
    }
  }

  function useKey(key) {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    state.content.clear(); // what a key may read changes with the key
    state.signatures.clear();
    state.newestCheckpoint = undefined;
    $("api-key").value = "";
    $("api-key").placeholder = key ? "key set for this tab (Forget to remove)" : "API key (read scope), if needed";
    tick();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useKey($("api-key").value.trim());
  });
  $("forget-key").addEventListener("click", () => useKey(""));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) tick();
  });
  if (apiKey()) $("api-key").placeholder = "key set for this tab (Forget to remove)";
  tick();
})();
