"""The node declarations: plain classes (inputs, outputs, tooltips, the function each node runs) that need nothing
from ComfyUI and hold no math; they call the package. ../registry.py lists them, ../v3.py makes them V3 nodes."""
