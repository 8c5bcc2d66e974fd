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

app.registerExtension({
  name: "adapttoken.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = SHOW_TEXT[nodeData.name];
    if (!name) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showText(this, name, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
