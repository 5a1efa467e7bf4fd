"""The pack's nodes as ComfyUI V3 nodes (comfy_api v0_0_2, pinned; docs/COMFYUI.md section 1).

Each node is declared once, as a plain class in this package (its inputs, outputs, tooltips and the function
that runs it), which needs nothing from ComfyUI and is what the tests without ComfyUI run. This module builds the
V3 node from that declaration: an io.Schema with typed sockets (the pack's own types as io.Custom), hidden inputs
read from the V3 `hidden` holder, `validate_inputs` from the declaration's queue-time checks, and, for the
training nodes, `fingerprint_inputs` returning a fresh value so that a queued run always trains or resumes.
Imported only inside a ComfyUI that provides comfy_api v0_0_2 (comfyui/version.py checks first).
"""

from __future__ import annotations

import uuid
from typing import Any

from comfy_api.v0_0_2 import ComfyExtension, io

CORE = {"MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "CONDITIONING": io.Conditioning, "IMAGE": io.Image,
        "LATENT": io.Latent}
HIDDEN = {"UNIQUE_ID": ("unique_id", io.Hidden.unique_id), "PROMPT": ("prompt", io.Hidden.prompt)}
_CUSTOM: dict[str, Any] = {}


def socket(kind: str) -> Any:
    """The io type of a socket: a core type, or the pack's own (DIPP_*) as one io.Custom type each."""
    if kind in CORE:
        return CORE[kind]
    if kind not in _CUSTOM:
        _CUSTOM[kind] = io.Custom(kind)
    return _CUSTOM[kind]


def _widget(name: str, kind: Any, opts: dict[str, Any], common: dict[str, Any]) -> Any:
    if isinstance(kind, list):
        return io.Combo.Input(name, options=kind, default=opts.get("default"), **common)
    if kind == "INT":
        return io.Int.Input(name, default=opts.get("default"), min=opts.get("min"), max=opts.get("max"),
                            step=opts.get("step"), **common)
    if kind == "FLOAT":
        return io.Float.Input(name, default=opts.get("default"), min=opts.get("min"), max=opts.get("max"),
                              step=opts.get("step"), round=opts.get("round"), **common)
    if kind == "STRING":
        return io.String.Input(name, default=opts.get("default"), multiline=opts.get("multiline", False), **common)
    if kind == "BOOLEAN":
        return io.Boolean.Input(name, default=opts.get("default"), **common)
    return None


def v3_input(name: str, spec: tuple[Any, ...], optional: bool) -> Any:
    kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    common = {"optional": optional, "tooltip": opts.get("tooltip")}
    widget = _widget(name, kind, opts, common)
    return widget if widget is not None else socket(kind).Input(name, **common)


def schema_of(node_id: str, display_name: str, definition: type) -> Any:
    spec = definition.INPUT_TYPES()
    inputs = [v3_input(n, s, False) for n, s in spec.get("required", {}).items()]
    inputs += [v3_input(n, s, True) for n, s in spec.get("optional", {}).items()]
    tips = getattr(definition, "OUTPUT_TOOLTIPS", (None,) * len(definition.RETURN_TYPES))
    outputs = [socket(t).Output(display_name=n, tooltip=tip)
               for t, n, tip in zip(definition.RETURN_TYPES, definition.RETURN_NAMES, tips, strict=True)]
    return io.Schema(node_id=node_id, display_name=display_name, category=definition.CATEGORY,
                     description=definition.DESCRIPTION, inputs=inputs, outputs=outputs,
                     hidden=[HIDDEN[v][1] for v in spec.get("hidden", {}).values()],
                     is_output_node=bool(getattr(definition, "OUTPUT_NODE", False)),
                     not_idempotent=bool(getattr(definition, "TRAINS", False)))


def v3_node(node_id: str, display_name: str, definition: type) -> type:
    """The V3 node class of one declaration (a new class per node id, named after it)."""
    hidden = {key: HIDDEN[value][0] for key, value in definition.INPUT_TYPES().get("hidden", {}).items()}

    def define_schema(cls: type) -> Any:
        return schema_of(node_id, display_name, definition)

    def execute(cls: type, **inputs: Any) -> Any:
        holder = getattr(cls, "hidden", None)
        for key, attr in hidden.items():
            inputs[key] = getattr(holder, attr, None) if holder is not None else None
        out = getattr(definition(), definition.FUNCTION)(**inputs)
        if isinstance(out, dict):
            return io.NodeOutput(*out.get("result", ()), ui=out.get("ui"))
        return io.NodeOutput(*out)

    body: dict[str, Any] = {"DEFINITION": definition, "__doc__": definition.DESCRIPTION,
                            "define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    if getattr(definition, "TRAINS", False):
        # every queued run trains (or resumes): a value that never matches the previous one
        body["fingerprint_inputs"] = classmethod(lambda cls, **inputs: uuid.uuid4().hex)
    checks = getattr(definition, "VALIDATE_INPUTS", None)
    if checks is not None:
        body["validate_inputs"] = classmethod(checks.__func__)  # its named arguments are what ComfyUI passes
    return type(node_id, (io.ComfyNode,), body)


class DiffInstructExtension(ComfyExtension):
    def __init__(self, definitions: dict[str, type], names: dict[str, str]) -> None:
        self.nodes = [v3_node(k, names[k], cls) for k, cls in definitions.items()]

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(self.nodes)
