// AdaptToken nodes in the ComfyUI frontend: show the answer (MLLM Answer), the budget summary
// (Budget Allocate) and the groups as split (Group Split: a clamped group_size shows here) on the
// node once it has run. Text streamed during generation is shown by the
// frontend itself (PromptServer.send_progress_text); the final text then replaces it.
//
// Only supported frontend APIs: app.registerExtension, the node's widgets, widget.element (the
// DOM element of a DOM widget; `inputEl` is its deprecated name), options.read_only (honoured by
// the Vue node renderer, "Nodes 2.0"), node.removeWidgetByName where the frontend has it.
// ComfyWidgets comes from an internal module: it is loaded on its own, so that a frontend without
// that shim still gets the text (as a plain text widget) instead of losing the whole extension.
import { app } from "../../scripts/app.js";

let ComfyWidgets = null;
try {
  ({ ComfyWidgets } = await import("../../scripts/widgets.js"));
} catch (e) {
  console.warn("adapttoken: ComfyWidgets is not available; results show as plain text widgets", e);
}

const SHOW_TEXT = {
  AdaptToken_MLLMAnswer: "answer_view",
  AdaptToken_BudgetAllocate: "summary_view",
  AdaptToken_GroupSplit: "groups_view",
};
const PROGRESS_TEXT_WIDGET = "$$node-text-preview";

function removeWidget(node, name) {
  if (typeof node.removeWidgetByName === "function") {
    if (node.widgets?.some((w) => w.name === name)) node.removeWidgetByName(name);
    return;
  }
  const i = node.widgets?.findIndex((w) => w.name === name) ?? -1;
  if (i > -1) {
    node.widgets[i].onRemove?.();
    node.widgets.splice(i, 1);
  }
}

function makeTextWidget(node, name) {
  let widget;
  if (ComfyWidgets?.STRING) {
    widget = ComfyWidgets.STRING(node, name, ["STRING", { multiline: true }], app).widget;
  } else {
    widget = node.addWidget("text", name, "", () => {}, {});
  }
  const el = widget.element ?? widget.inputEl;
  if (el) {
    el.readOnly = true;
    el.style.opacity = 0.85;
  }
  widget.serialize = false;          // not part of the saved workflow's widgets_values
  widget.options = { ...(widget.options ?? {}), serialize: false, read_only: true };
  return widget;
}

function showText(node, name, text) {
  removeWidget(node, PROGRESS_TEXT_WIDGET);
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    widget = makeTextWidget(node, name);
    // the Vue node renderer keeps a view of node.widgets that the assignment refreshes (newer
    // frontends define node.widgets with a setter for it); for the canvas renderer a no-op
    if (Array.isArray(node.widgets)) node.widgets = node.widgets.slice();
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

// -- the evidence timeline (Budget Allocate, MLLM Answer) ------------------------------------------
// Drawn on a <canvas> in a DOM widget, from the node's `timeline` output (adapttoken.evidence.timeline):
// row 1, one column per group (index order; strided groups each span the whole video): height =
// relevance (1 - H/Hmax), colour = share of the budget, skipped groups (Lite) grey, a red line
// after Lite's stop; row 2, kept tokens over video time with the key moments marked; row 3, the
// key moments' thumbnails. Hover shows the group or the time; a click on row 2 or 3 seeks the Load
// Video preview upstream to that time.
const TIMELINE_WIDGET = "timeline_view";
const TL = { groupsH: 46, gap: 8, densityH: 34, thumbsH: 62, pad: 4 };
TL.height = TL.groupsH + TL.gap + TL.densityH + TL.gap + TL.thumbsH + 2 * TL.pad;

function upstreamNode(node, type, seen = new Set()) {
  if (!node || seen.has(node.id)) return null;
  seen.add(node.id);
  if (node.type === type || node.comfyClass === type) return node;
  for (let i = 0; i < (node.inputs?.length ?? 0); i++) {
    const found = upstreamNode(node.getInputNode?.(i), type, seen);
    if (found) return found;
  }
  return null;
}

function previewVideo(node) {
  for (const w of node?.widgets ?? []) {
    const el = w.element ?? w.inputEl;
    const v = el?.tagName === "VIDEO" ? el : el?.querySelector?.("video");
    if (v) return v;
  }
  return node?.videoContainer?.querySelector?.("video") ?? null;
}

function drawTimeline(tl) {
  const { canvas, data } = tl;
  const W = Math.max(1, canvas.clientWidth), H = TL.height;
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(W * dpr)) canvas.width = Math.round(W * dpr);
  canvas.height = Math.round(H * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#1b1e25";
  ctx.fillRect(0, 0, W, H);
  const groups = data.groups ?? [];
  const n = Math.max(1, groups.length);
  const gw = W / n;
  tl.groupPx = gw;
  const maxBudget = Math.max(1, ...groups.map((g) => g.budget || 0));
  let y = TL.pad;
  groups.forEach((g, i) => {
    const x = i * gw;
    if (g.skipped) {
      ctx.fillStyle = "#3a3d44";
      ctx.fillRect(x, y, Math.max(1, gw - 1), TL.groupsH);
      return;
    }
    const rel = g.relevance ?? (g.h == null ? 0 : 1 - g.h);
    const h = Math.max(1, rel * TL.groupsH);
    const share = (g.budget || 0) / maxBudget;
    ctx.fillStyle = `hsl(${140 - 100 * share}, 70%, ${35 + 25 * share}%)`;
    ctx.fillRect(x, y + TL.groupsH - h, Math.max(1, gw - 1), h);
  });
  if (data.stop != null) {
    const x = (data.stop + 1) * gw;
    ctx.fillStyle = "#e0533d";
    ctx.fillRect(Math.min(W - 2, x), y, 2, TL.groupsH);
  }
  y += TL.groupsH + TL.gap;
  const dens = data.density ?? [];
  const maxD = Math.max(1, ...dens);
  const bw = W / Math.max(1, dens.length);
  ctx.fillStyle = "#5b8fd6";
  dens.forEach((c, i) => {
    const h = (c / maxD) * TL.densityH;
    if (h > 0) ctx.fillRect(i * bw, y + TL.densityH - h, Math.max(1, bw), h);
  });
  const dur = data.duration || 1;
  ctx.fillStyle = "#f2b134";
  for (const m of data.moments ?? []) {
    const x = (m.time / dur) * W;
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x - 4, y - 6);
    ctx.lineTo(x + 4, y - 6);
    ctx.fill();
  }
  y += TL.densityH + TL.gap;
  tl.thumbRects = [];
  const ms = data.moments ?? [];
  const tw = ms.length ? Math.min(96, (W - TL.pad * (ms.length + 1)) / ms.length) : 0;
  ms.forEach((m, i) => {
    const x = TL.pad + i * (tw + TL.pad);
    const img = tl.images[i];
    if (img?.complete && img.naturalWidth) {
      const h = Math.min(TL.thumbsH - 12, (img.naturalHeight / img.naturalWidth) * tw);
      ctx.drawImage(img, x, y, tw, h);
    }
    ctx.fillStyle = "#ddd";
    ctx.font = "10px sans-serif";
    ctx.fillText(`${m.time.toFixed(1)} s`, x, y + TL.thumbsH - 2);
    tl.thumbRects.push([x, y, tw, TL.thumbsH, m.time]);
  });
  if (tl.hover) {
    ctx.font = "11px sans-serif";
    const tw2 = ctx.measureText(tl.hover).width + 8;
    ctx.fillStyle = "rgba(0,0,0,0.75)";
    ctx.fillRect(W - tw2 - 2, 2, tw2, 16);
    ctx.fillStyle = "#fff";
    ctx.fillText(tl.hover, W - tw2 + 2, 14);
  }
}

function timelineAt(tl, ev) {
  const r = tl.canvas.getBoundingClientRect();
  const W = Math.max(1, tl.canvas.clientWidth);
  const x = ((ev.clientX - r.left) / Math.max(1, r.width)) * W;
  const y = ((ev.clientY - r.top) / Math.max(1, r.height)) * TL.height;
  const dur = tl.data.duration || 1;
  if (y < TL.pad + TL.groupsH + TL.gap / 2) {
    const g = tl.data.groups?.[Math.floor(x / Math.max(1e-6, tl.groupPx))];
    return g ? { group: g } : {};
  }
  for (const [tx, ty, tw, th, t] of tl.thumbRects ?? []) {
    if (x >= tx && x <= tx + tw && y >= ty && y <= ty + th) return { time: t };
  }
  return { time: Math.max(0, Math.min(dur, (x / W) * dur)) };
}

function seekPreview(node, t) {
  const video = previewVideo(upstreamNode(node, "AdaptToken_LoadVideo"));
  if (!video) return false;
  video.currentTime = Math.max(0, Math.min(t, Number.isFinite(video.duration) ? video.duration : t));
  return true;
}

function showTimeline(node, data) {
  let widget = node.widgets?.find((w) => w.name === TIMELINE_WIDGET);
  if (!widget) {
    const box = document.createElement("div");
    box.style.cssText = "width:100%;";
    const canvas = document.createElement("canvas");
    canvas.style.cssText = `width:100%;height:${TL.height}px;display:block;cursor:pointer;`;
    box.appendChild(canvas);
    widget = node.addDOMWidget(TIMELINE_WIDGET, "adapttoken_timeline", box, {
      serialize: false, hideOnZoom: false, getMinHeight: () => TL.height + 4,
      getHeight: () => TL.height + 4,
    });
    widget.serialize = false;
    widget.options = { ...(widget.options ?? {}), serialize: false, read_only: true };
    const tl = { canvas, node, images: [], hover: "", data: { groups: [] } };
    widget.adapttokenTimeline = tl;
    canvas.addEventListener("mousemove", (ev) => {
      const hit = timelineAt(tl, ev);
      const g = hit.group;
      tl.hover = g ? `group ${g.group}: ${g.t0.toFixed(1)}-${g.t1.toFixed(1)} s` +
        (g.skipped ? " (skipped)" : `, H/Hmax ${(g.h ?? 1).toFixed(2)}, budget ${g.budget}, kept ${g.kept}`)
        : hit.time != null ? `${hit.time.toFixed(2)} s` : "";
      drawTimeline(tl);
    });
    canvas.addEventListener("mouseleave", () => { tl.hover = ""; drawTimeline(tl); });
    canvas.addEventListener("click", (ev) => {
      const hit = timelineAt(tl, ev);
      if (hit.time != null) {
        tl.lastSeek = hit.time;
        tl.seeked = seekPreview(node, hit.time);
      }
    });
    if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => drawTimeline(tl)).observe(canvas);
    if (Array.isArray(node.widgets)) node.widgets = node.widgets.slice();   // Vue renderer: see above
  }
  const tl = widget.adapttokenTimeline;
  tl.data = data;
  tl.images = (data.moments ?? []).map((m) => {
    const img = new Image();
    img.onload = () => drawTimeline(tl);
    img.src = m.thumb ?? "";
    return img;
  });
  drawTimeline(tl);
  node.setDirtyCanvas?.(true, true);
}

const TIMELINE_NODES = new Set(["AdaptToken_BudgetAllocate", "AdaptToken_MLLMAnswer"]);

app.registerExtension({
  name: "adapttoken.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = SHOW_TEXT[nodeData.name];
    const withTimeline = TIMELINE_NODES.has(nodeData.name);
    if (!name && !withTimeline) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (name && text?.length) showText(this, name, Array.isArray(text) ? text.join("\n") : String(text));
      const tl = message?.timeline;
      if (withTimeline && tl?.length) {
        try {
          showTimeline(this, JSON.parse(Array.isArray(tl) ? tl[0] : tl));
        } catch (e) {
          console.warn("adapttoken: timeline not shown", e);
        }
      }
    };
  },
});
