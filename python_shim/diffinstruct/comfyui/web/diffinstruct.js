// Diff-Instruct++ on the canvas: a node's results (reward before -> after, fidelity, checkpoint folder, saved file)
// and, while Train / Align run, the live status (step, reward, diversity, warnings) in a read-only text box on the
// node itself. Python sends both: the results as the node's `ui.text`, the live status as the
// "diffinstruct.progress" event (docs/COMFYUI.md section 10).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "dipp_status";

function statusWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, WIDGET, ["STRING", { multiline: true }], app).widget;
    // a display, not an input: saved neither into the workflow (serialize) nor into the queued prompt
    // (options.serialize), where it would change the run's folder name (comfyui/runs.py)
    widget.serialize = false;
    widget.options = { ...(widget.options ?? {}), serialize: false };
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.dataset.dippStatus = "1";
      widget.inputEl.style.opacity = 0.85;
    }
    // room for the text: the node keeps its width and grows by a few lines (workflows store the old size)
    node.setSize([Math.max(node.size[0], 340), node.size[1] + 110]);
  }
  return widget;
}

function show(node, text, warning) {
  const widget = statusWidget(node);
  widget.value = text;
  if (widget.inputEl) {
    widget.inputEl.value = text;
    widget.inputEl.style.color = warning ? "#ff6b6b" : "";
  }
  node.dippStatus = text; // read by the browser test
  node.setDirtyCanvas(true, true);
}

function findNode(id) {
  const graph = app.graph;
  return graph?.getNodeById?.(Number(id)) ?? graph?.getNodeById?.(id);
}

app.registerExtension({
  name: "diffinstruct.canvas",
  async setup() {
    api.addEventListener("diffinstruct.progress", (event) => {
      const detail = event.detail ?? {};
      const node = findNode(detail.node);
      if (node) show(node, (detail.lines ?? []).join("\n"), Boolean(detail.warning));
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("DIPP")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const lines = message?.text;
      if (Array.isArray(lines) && lines.length) {
        show(this, lines.join("\n"), Array.isArray(message?.warning) && message.warning.length > 0);
      }
    };
  },
});
