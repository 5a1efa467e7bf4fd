"""`python -m diffinstruct.comfyui install | uninstall --comfyui DIR` is `diffinstruct comfyui ...`."""

import sys

from diffinstruct.cli import main

raise SystemExit(main(["comfyui", *sys.argv[1:]]))
