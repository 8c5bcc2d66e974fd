#!/usr/bin/env node
// Drive the real ComfyUI frontend in headless Chromium.
//
// For each UI-format workflow (the JSON users save and share) this loads it into the graph the way
// a person opening the file would, takes a screenshot, and writes the API-format prompt the
// frontend would queue (`app.graphToPrompt().output`), so Python tests can POST it to /prompt.
// With --queue it also queues the workflow from the page and waits for the run to end.
//
// Usage:
//   node comfy_ui.mjs [options] <comfyui-url> <out-dir> <workflow.json>...
// Options:
//   --chromium PATH          browser binary (default: $CHROMIUM or /usr/bin/chromium)
//   --require-nodes A,B      fail unless these node types are registered in the frontend
//   --queue                  queue each workflow from the page and wait for success
//   --timeout-ms N           limit for each step (default 60000)
//   --run-timeout-ms N       limit for one queued run (default 300000)
//   --probe-timeline         after a queued run, inspect Budget Allocate's evidence timeline: present,
//                            widths before/after widening the node, a click on the best moment's time
//                            and the Load Video preview's currentTime after it (results: timeline)
//   --width N --height N     viewport (default 1600x1000)
// Outputs in <out-dir>, per workflow <stem>: <stem>.png, <stem>.api.json, with --queue also
// <stem>.after.png; and for the whole run: console.log (page console and errors) and
// results.json ([{workflow, ok, error?, missing_nodes?, api?, screenshot?, run?}]).
// Exit code: 0 all ok; 1 some workflow failed; 2 setup failed (browser, page, frontend); 64 usage.

import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";

const USAGE = "usage: node comfy_ui.mjs [--chromium PATH] [--require-nodes A,B] [--queue] " +
  "[--timeout-ms N] [--run-timeout-ms N] [--width N] [--height N] <comfyui-url> <out-dir> <workflow.json>...";

const CHROMIUM_FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

function parseArgs(argv) {
  const opts = {
    chromium: process.env.CHROMIUM || "/usr/bin/chromium",
    requireNodes: [], queue: false, probeTimeline: false, timeoutMs: 60000, runTimeoutMs: 300000,
    width: 1600, height: 1000, positional: [],
  };
  const num = (name, v) => {
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) usage(`${name} needs a positive number, got ${v}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--chromium") opts.chromium = next();
    else if (a === "--require-nodes") opts.requireNodes = next().split(",").map((s) => s.trim()).filter(Boolean);
    else if (a === "--queue") opts.queue = true;
    else if (a === "--probe-timeline") opts.probeTimeline = true;
    else if (a === "--timeout-ms") opts.timeoutMs = num(a, next());
    else if (a === "--run-timeout-ms") opts.runTimeoutMs = num(a, next());
    else if (a === "--width") opts.width = num(a, next());
    else if (a === "--height") opts.height = num(a, next());
    else if (a === "-h" || a === "--help") { console.log(USAGE); process.exit(0); }
    else if (a.startsWith("--")) usage(`unknown option ${a}`);
    else opts.positional.push(a);
  }
  if (opts.positional.length < 3) usage("need a ComfyUI url, an output dir and at least one workflow");
  [opts.url, opts.outDir, ...opts.workflows] = opts.positional;
  return opts;
}

function usage(msg) {
  console.error(`comfy_ui: ${msg}\n${USAGE}`);
  process.exit(64);
}

function stemOf(path) {
  return basename(path).replace(/\.json$/i, "");
}

// Each step gets its own limit so that a hang says where it hung.
async function step(name, ms, fn) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${name}`)), ms);
  });
  try {
    return await Promise.race([fn(), limit]);
  } finally {
    clearTimeout(timer);
  }
}

async function loadPlaywright() {
  try {
    return await import("playwright-core");
  } catch (e) {
    throw new Error(`playwright-core is not installed: run "npm ci" in tests/browser (${e.message})`);
  }
}

async function openComfy(opts, consoleLines) {
  if (!existsSync(opts.chromium)) throw new Error(`no browser at ${opts.chromium} (install Debian's chromium or pass --chromium)`);
  const { chromium } = await loadPlaywright();
  const profile = mkdtempSync(join(tmpdir(), "comfy-ui-profile-"));
  const context = await step("launch chromium", opts.timeoutMs, () => chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: opts.width, height: opts.height },
  }));
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(opts.timeoutMs);
  page.on("console", (m) => consoleLines.push(`[console.${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`[pageerror] ${e.stack || e.message}`));
  page.on("requestfailed", (r) => consoleLines.push(`[requestfailed] ${r.url()} ${r.failure()?.errorText ?? ""}`));
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  try {
    const resp = await step(`open ${opts.url}`, opts.timeoutMs, () => page.goto(opts.url, { waitUntil: "domcontentloaded" }));
    if (!resp || !resp.ok()) throw new Error(`GET ${opts.url} answered ${resp ? resp.status() : "nothing"}`);
    await step("wait for window.app.graph", opts.timeoutMs,
      () => page.waitForFunction(() => Boolean(window.app?.graph && window.LiteGraph?.registered_node_types)));
    // window.app is set before the frontend restores the previous (or default) workflow; a graph
    // loaded before that restore would be replaced by it. The restore ends with an active workflow.
    await page.waitForFunction(() => {
      const store = window.app.extensionManager?.workflow;
      return store ? Boolean(store.activeWorkflow) : true;
    }, null, { timeout: Math.min(opts.timeoutMs, 15000) }).catch(() => {
      consoleLines.push("[comfy_ui] no active workflow after start-up; going on");
    });
    if (opts.requireNodes.length) {
      await step(`wait for node types ${opts.requireNodes.join(",")}`, opts.timeoutMs,
        () => page.waitForFunction((types) => types.every((t) => t in window.LiteGraph.registered_node_types),
          opts.requireNodes)).catch(async (e) => {
        const missing = await page.evaluate((types) => types.filter((t) => !(t in window.LiteGraph.registered_node_types)),
          opts.requireNodes);
        throw new Error(`${e.message}; missing node types: ${missing.join(", ")} (did the pack import? see the server log)`);
      });
    }
    await dismissDialogs(page);
    return { page, close };
  } catch (e) {
    await close();
    throw e;
  }
}

// First-run dialogs (templates, release notes) sit over the canvas: Escape closes them.
async function dismissDialogs(page) {
  for (let i = 0; i < 3; i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(200);
  }
}

async function convertOne(page, opts, file) {
  const stem = stemOf(file);
  const result = { workflow: file, ok: false };
  let ui;
  try {
    ui = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    result.error = `cannot read workflow: ${e.message}`;
    return result;
  }
  if (!ui || !Array.isArray(ui.nodes)) {
    result.error = "not a UI-format workflow (no nodes array); API-format prompts need no conversion";
    return result;
  }
  const missing = await page.evaluate((types) => [...new Set(types)].filter((t) => !(t in window.LiteGraph.registered_node_types)),
    ui.nodes.map((n) => n.type));
  if (missing.length) {
    result.missing_nodes = missing;
    result.error = `node types not registered in the frontend: ${missing.join(", ")}`;
    return result;
  }
  try {
    await step(`loadGraphData ${stem}`, opts.timeoutMs, () => loadGraph(page, ui));
    await dismissDialogs(page);
    await page.evaluate(() => window.app.canvas?.setDirty(true, true));
    result.screenshot = join(opts.outDir, `${stem}.png`);
    await step(`screenshot ${stem}`, opts.timeoutMs, () => page.screenshot({ path: result.screenshot }));
    const api = await step(`graphToPrompt ${stem}`, opts.timeoutMs, () => page.evaluate(async () => (await window.app.graphToPrompt()).output));
    result.api = join(opts.outDir, `${stem}.api.json`);
    writeFileSync(result.api, JSON.stringify(api, null, 2) + "\n");
    if (opts.queue) {
      result.run = await queueFromPage(page, opts, stem);
      if (result.run.status !== "success") {
        result.error = `queued run ended with ${result.run.status}${result.run.message ? `: ${result.run.message}` : ""}`;
        return result;
      }
      if (opts.probeTimeline) {
        result.timeline = await step(`timeline ${stem}`, opts.timeoutMs, () => probeTimeline(page));
        await page.screenshot({ path: join(opts.outDir, `${stem}.timeline.png`) });
      }
    }
    result.ok = true;
  } catch (e) {
    result.error = e.message;
  }
  return result;
}

// The evidence timeline on Budget Allocate (web/js/adapttoken.js): what a person would check by eye.
async function probeTimeline(page) {
  return page.evaluate(async () => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const node = window.app.graph.nodes.find((n) => n.type === "AdaptToken_BudgetAllocate");
    const w = node?.widgets?.find((x) => x.name === "timeline_view");
    const tl = w?.adapttokenTimeline;
    if (!tl) return { present: false };
    const canvas = tl.canvas;
    const out = { present: true, groups: tl.data.groups.length, width1: canvas.clientWidth,
                  groupPx1: tl.groupPx, duration: tl.data.duration };
    node.setSize([node.size[0] * 1.6, node.size[1]]);
    window.app.canvas.setDirty(true, true);
    await sleep(800);
    out.width2 = canvas.clientWidth;
    out.groupPx2 = tl.groupPx;
    const lv = window.app.graph.nodes.find((n) => n.type === "AdaptToken_LoadVideo");
    let video = null;
    for (const x of lv?.widgets ?? []) {
      const el = x.element ?? x.inputEl;
      video = el?.tagName === "VIDEO" ? el : el?.querySelector?.("video");
      if (video) break;
    }
    out.hasVideo = !!video;
    if (video && video.readyState < 1) {
      await new Promise((r) => { video.addEventListener("loadedmetadata", r, { once: true }); setTimeout(r, 5000); });
    }
    out.before = video?.currentTime ?? null;
    const m = tl.data.moments?.[0];
    out.moment = m?.time ?? null;
    if (m) {
      const r = canvas.getBoundingClientRect();
      const rowY = (4 + 46 + 8 + 17) / (4 + 46 + 8 + 34 + 8 + 62 + 4);
      canvas.dispatchEvent(new MouseEvent("click", { bubbles: true,
        clientX: r.left + (m.time / tl.data.duration) * r.width, clientY: r.top + rowY * r.height }));
      await sleep(500);
    }
    out.lastSeek = tl.lastSeek ?? null;
    out.seeked = tl.seeked ?? false;
    out.after = video?.currentTime ?? null;
    return out;
  });
}

// Load a UI-format graph and check that the canvas now holds exactly its nodes.
async function loadGraph(page, ui) {
  const want = ui.nodes.map((n) => String(n.id)).sort().join(",");
  let have = "";
  for (let attempt = 0; attempt < 3; attempt++) {
    have = await page.evaluate(async (g) => {
      await window.app.loadGraphData(structuredClone(g), true, true, null);
      return window.app.graph.nodes.map((n) => String(n.id)).sort().join(",");
    }, ui);
    await page.waitForTimeout(250);
    const now = await page.evaluate(() => window.app.graph.nodes.map((n) => String(n.id)).sort().join(","));
    if (have === want && now === want) return;
    have = now;
  }
  throw new Error(`the canvas holds nodes [${have}] after loading, not the workflow's [${want}]`);
}

// Queue the loaded graph as the Queue button does and wait for the server's verdict on it.
async function queueFromPage(page, opts, stem) {
  const run = await step(`queue ${stem}`, opts.runTimeoutMs, () => page.evaluate(async () => {
    const api = window.app.api;
    const events = ["execution_success", "execution_error", "execution_interrupted"];
    const seen = [];
    const onEvent = (ev) => seen.push([ev.type, ev.detail || {}]);
    events.forEach((t) => api.addEventListener(t, onEvent));
    // app.queuePrompt returns nothing: catch the prompt id on its way back from POST /prompt.
    const ids = [];
    const original = api.queuePrompt;
    api.queuePrompt = async function (...args) {
      const r = await original.apply(this, args);
      if (r?.prompt_id) ids.push(r.prompt_id);
      return r;
    };
    try {
      await window.app.queuePrompt(0, 1);
      if (!ids.length) {
        const errs = window.app.lastNodeErrors;
        return { status: "not_queued", message: errs ? JSON.stringify(errs) : "the frontend queued nothing" };
      }
      const promptId = ids[0];
      for (;;) {
        const hit = seen.find(([, d]) => d.prompt_id === promptId);
        if (hit) return { prompt_id: promptId, status: hit[0].replace("execution_", ""), message: hit[1].exception_message || "" };
        // The websocket may have missed the end (reconnect): history has the verdict too.
        const h = await (await api.fetchApi(`/history/${promptId}`)).json();
        const st = h[promptId]?.status;
        if (st?.status_str === "success") return { prompt_id: promptId, status: "success", message: "" };
        if (st?.status_str === "error") return { prompt_id: promptId, status: "error", message: JSON.stringify(st.messages) };
        await new Promise((r) => setTimeout(r, 250));
      }
    } finally {
      api.queuePrompt = original;
      events.forEach((t) => api.removeEventListener(t, onEvent));
    }
  }));
  await page.waitForTimeout(300);
  await page.evaluate(() => window.app.canvas?.setDirty(true, true));
  await page.screenshot({ path: join(opts.outDir, `${stem}.after.png`) });
  return run;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  opts.outDir = resolve(opts.outDir);
  mkdirSync(opts.outDir, { recursive: true });
  const consoleLines = [];
  const results = [];
  const writeLogs = () => {
    writeFileSync(join(opts.outDir, "console.log"), consoleLines.join("\n") + "\n");
    writeFileSync(join(opts.outDir, "results.json"), JSON.stringify(results, null, 2) + "\n");
  };
  let session;
  try {
    session = await openComfy(opts, consoleLines);
  } catch (e) {
    console.error(`comfy_ui: setup failed: ${e.message}`);
    writeLogs();
    return 2;
  }
  try {
    for (const file of opts.workflows) {
      const r = await convertOne(session.page, opts, resolve(file));
      results.push(r);
      console.log(r.ok ? `ok   ${file}` : `FAIL ${file}: ${r.error}`);
    }
  } finally {
    await session.close();
    writeLogs();
  }
  return results.every((r) => r.ok) ? 0 : 1;
}

main().then((code) => process.exit(code), (e) => {
  console.error(`comfy_ui: ${e.stack || e.message}`);
  process.exit(2);
});
