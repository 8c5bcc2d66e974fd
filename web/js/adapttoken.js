// AdaptToken nodes in the ComfyUI frontend: show the answer (MLLM Answer), the budget summary
// (Budget Allocate) and the groups as split (Group Split: a clamped group_size shows here) on the
// node once it has run. Text streamed during generation is shown by the
// frontend itself (PromptServer.send_progress_text); the final text then replaces it.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SHOW_TEXT = {
  AdaptToken_MLLMAnswer: "answer_view",
  AdaptToken_BudgetAllocate: "summary_view",
  AdaptToken_GroupSplit: "groups_view",
};
const PROGRESS_TEXT_WIDGET = "$$node-text-preview";

function showText(node, name, text) {
  const streamed = node.widgets?.findIndex((w) => w.name === PROGRESS_TEXT_WIDGET) ?? -1;
  if (streamed > -1) {
    node.widgets[streamed].onRemove?.();
    node.widgets.splice(streamed, 1);
  }
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, name, ["STRING", { multiline: true }], app).widget;
    const el = widget.inputEl ?? widget.element;
    if (el) {
      el.readOnly = true;
      el.style.opacity = 0.85;
    }
    widget.serialize = false;          // not part of the saved workflow's widgets_values
    widget.options = { ...(widget.options ?? {}), serialize: false };  // nor of the prompt
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
