"""Progress bars on stderr (tqdm), silent when stderr is not a terminal or when disabled."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm import tqdm


def bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "it",
        enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr that clears itself when done; shown only on a terminal, never when
    ``enabled`` is false. Use as tqdm: iterate over it, or call ``update(n)`` and ``close()``."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                disable=None if enabled else True, dynamic_ncols=True)
