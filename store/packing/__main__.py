"""``python -m store.packing``: compile or load every kernel and print what happened, as JSON.

Run it once before timing anything on a new machine or guest (e.g. with ``NUMBA_CPU_NAME=generic``
and the ``NUMBA_CACHE_DIR`` the guest will use, to hand the guest kernels compiled on the host);
the ``cache_hits`` / ``cache_misses`` per kernel say whether an existing cache was reused.
"""

from __future__ import annotations

import json

from store.packing import warmup

if __name__ == "__main__":
    print(json.dumps(warmup(), indent=2))
