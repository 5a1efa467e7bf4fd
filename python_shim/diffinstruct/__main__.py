"""`python -m diffinstruct train | sample | eval` (see cli.py)."""

from .cli import main

raise SystemExit(main())
