"""``python -m cypq``: the ``cypq`` command."""
from .cli import main

raise SystemExit(main())
