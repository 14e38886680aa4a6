"""Umbra's store: a Mooncake-style KV-cache store usable as a library.

The package is self-contained: it never imports ``fault`` or ``scenarios``. Those reach it only
through :mod:`store.failpoints` and the read-only introspection each component exposes.
"""

__version__ = "0.1.0"
