"""Umbra's fault-injection layer: acts on the store's real mechanisms through its failpoints and
public introspection. May import ``store``; never imported by it."""
