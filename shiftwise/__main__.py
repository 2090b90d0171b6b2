"""``python -m shiftwise``: the ``shiftwise`` command."""
from .cli import main

raise SystemExit(main())
