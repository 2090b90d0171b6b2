"""Progress bars on stderr (tqdm), silent when stderr is not a terminal or when disabled."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm import tqdm


def bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "it",
        enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr that clears itself when done; shown only on a terminal, never when
    ``enabled`` is false; ``initial`` is where it starts (a resumed run). Use as tqdm: iterate over
    it, or call ``update(n)`` and ``close()``."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, initial=initial,
                disable=None if enabled else True, dynamic_ncols=True)
