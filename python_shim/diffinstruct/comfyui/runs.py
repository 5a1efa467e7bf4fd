"""Where a training node's run lives when its checkpoint_dir is empty: a folder named after the run itself, so that
queueing the same workflow again (after Cancel, or with more steps) finds and resumes it.

The name comes from the part of the queued prompt that decides what is trained: the node's own inputs and,
through its links, every node upstream of it (their class and inputs), hashed. Inputs that only say how long,
how visibly or in how much memory to train (steps, checkpoint_every, the live view's settings, resume,
gradient_checkpointing) are left out of the node's
own inputs, so raising steps continues the run. Any other change (a prompt, alpha, seed, another checkpoint
upstream) gives a new folder. Nothing here needs ComfyUI (docs/COMFYUI.md section 9).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Any

# the node's own inputs that do not change what is trained
NOT_THE_RUN = frozenset({"steps", "checkpoint_every", "checkpoint_dir", "preview_every", "diversity_warning",
                         "resume", "gradient_checkpointing"})
# the web extension's status box (comfyui/web/diffinstruct.js): never part of a run, on any node
DISPLAY_ONLY = frozenset({"dipp_status"})
KEY_CHARS = 12


def _canonical(prompt: dict[str, Any], node_id: str, seen: tuple[str, ...], skip: frozenset[str]) -> Any:
    if node_id in seen:  # ComfyUI refuses cycles; this only keeps a malformed prompt from recursing forever
        return ["cycle", node_id]
    entry = prompt.get(node_id)
    if not isinstance(entry, dict):
        return ["missing", node_id]
    inputs = {}
    for name, value in sorted(entry.get("inputs", {}).items()):
        if name in skip or name in DISPLAY_ONLY:
            continue
        if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:  # a link: [node id, slot]
            inputs[name] = [_canonical(prompt, str(value[0]), (*seen, node_id), frozenset()), value[1]]
        else:
            inputs[name] = value
    return {"class_type": entry.get("class_type"), "inputs": inputs}


def run_key(prompt: dict[str, Any] | None, node_id: str | None) -> str | None:
    """The run's key (hex), or None without a prompt (a node called outside ComfyUI's executor)."""
    if not isinstance(prompt, dict) or node_id is None or str(node_id) not in prompt:
        return None
    canonical = _canonical(prompt, str(node_id), (), NOT_THE_RUN)
    text = json.dumps(canonical, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_CHARS]


def runs_root() -> str:
    """<ComfyUI output>/diffinstruct_runs (the system temp folder's, without ComfyUI)."""
    try:
        import folder_paths

        return os.path.join(folder_paths.get_output_directory(), "diffinstruct_runs")
    except ImportError:
        import tempfile

        return os.path.join(tempfile.gettempdir(), "diffinstruct_runs")


def default_run_dir(kind: str, prompt: dict[str, Any] | None = None, node_id: str | None = None) -> str:
    """`<runs root>/<kind>-<run key>`: the same folder for the same queued run; a fresh, dated folder when there is
    no prompt to name the run after."""
    key = run_key(prompt, node_id)
    if key is not None:
        return os.path.join(runs_root(), f"{kind}-{key}")
    return os.path.join(runs_root(), f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
