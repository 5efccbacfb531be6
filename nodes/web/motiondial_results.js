// MotionDial: show a node's result text (its `ui.text`) on the node itself, under its widgets.
// ComfyUI sends `ui` in the "executed" message but draws it only for nodes with an extension.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = ["MotionDialEstimateMotion", "MotionDialBuildTaskVectors"];
const WIDGET = "motiondial_result";

app.registerExtension({
  name: "MotionDial.ResultText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.style.opacity = 0.8;
        widget.serialize = false; // not part of the saved workflow's widget values
        widget.options = { ...(widget.options ?? {}), serialize: false }; // nor of the prompt
      }
      widget.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
