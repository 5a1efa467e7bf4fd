"""`python -m diffinstruct train | sample | eval | ...`, the same as the `diffinstruct` command (cli.py)."""

from .cli import main

raise SystemExit(main())
