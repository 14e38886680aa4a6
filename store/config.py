"""Client configuration with Mooncake's keys, file format and environment overrides.

Existing deployments configure Mooncake through a JSON file named by ``MOONCAKE_CONFIG_PATH`` or
a dict passed to ``setup``; Umbra reads the same keys so a config can move over unchanged. Keys
Mooncake knows but Umbra does not act on are accepted with a warning; unknown keys and bad values
are rejected with a message naming the key, because a typo silently ignored is how a node ends
up with a 16 MiB segment instead of 100 GB.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from store.errors import ErrorCode, StoreError
from store.units import parse_size

log = logging.getLogger(__name__)

CONFIG_PATH_ENV = "MOONCAKE_CONFIG_PATH"
PROTOCOLS = ("tcp", "rdma")
DEFAULT_GLOBAL_SEGMENT_SIZE = 3_355_443_200  # Mooncake's Python default (3.125 GiB)
DEFAULT_LOCAL_BUFFER_SIZE = 1_073_741_824

# Environment variables Mooncake's integrations honour, and the key each overrides.
ENV_OVERRIDES = {
    "MOONCAKE_MASTER": "master_server_address",
    "MOONCAKE_PROTOCOL": "protocol",
    "MOONCAKE_DEVICE": "device_name",
    "MOONCAKE_TE_META_DATA_SERVER": "metadata_server",
    "MOONCAKE_LOCAL_HOSTNAME": "local_hostname",
    "MOONCAKE_GLOBAL_SEGMENT_SIZE": "global_segment_size",
    "MOONCAKE_LOCAL_BUFFER_SIZE": "local_buffer_size",
}

# Mooncake keys accepted for compatibility but without effect here.
IGNORED_KEYS = frozenset({
    "enable_ssd_offload", "ssd_offload_path", "tenant_id", "ipc_socket_path", "rdma_devices_auto",
    "enable_offload", "engine",
})
# Alternative spellings used by Mooncake's different entry points.
ALIASES = {"master_server_addr": "master_server_address", "rdma_devices": "device_name"}


class ConfigError(StoreError):
    """A configuration value is missing or wrong; the message names the key and the value."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_PARAMS, message)


@dataclass(frozen=True)
class ClientConfig:
    local_hostname: str = "127.0.0.1"
    metadata_server: str = "P2PHANDSHAKE"
    global_segment_size: int = DEFAULT_GLOBAL_SEGMENT_SIZE
    local_buffer_size: int = DEFAULT_LOCAL_BUFFER_SIZE
    protocol: str = "tcp"
    device_name: str = ""
    master_server_address: str = "127.0.0.1:50051"
    enable_client_http_server: bool = False
    client_http_port: int = 9300

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def master_host_port(self) -> tuple[str, int]:
        return split_host_port(self.master_server_address, "master_server_address")


def split_host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}={value!r}: expected host:port")
    return host, int(port)


def _coerce(key: str, value: Any) -> Any:
    if key in ("global_segment_size", "local_buffer_size"):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    if key == "protocol":
        proto = str(value).lower()
        if proto not in PROTOCOLS:
            raise ConfigError(f"protocol={value!r}: expected one of {PROTOCOLS}")
        return proto
    if key == "client_http_port":
        try:
            port = int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"client_http_port={value!r}: expected an int") from exc
        if not 0 <= port < 65536:
            raise ConfigError(f"client_http_port={value!r}: out of range")
        return port
    if key == "enable_client_http_server":
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: expected a string")
    return value


def from_dict(values: dict[str, Any], *, environ: dict[str, str] | None = None) -> ClientConfig:
    """Build a config from a Mooncake-style dict, then apply ``MOONCAKE_*`` env overrides."""
    known = {f.name for f in fields(ClientConfig)}
    merged: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key, raw_key)
        if key in IGNORED_KEYS:
            log.warning("config key %r is accepted for Mooncake compatibility and has no effect", raw_key)
            continue
        if key not in known:
            raise ConfigError(f"unknown config key {raw_key!r}; known keys: {sorted(known)}")
        merged[key] = _coerce(key, value)
    env = os.environ if environ is None else environ
    for var, key in ENV_OVERRIDES.items():
        if env.get(var):
            merged[key] = _coerce(key, env[var])
    cfg = ClientConfig(**merged)
    for key in ("local_hostname", "metadata_server", "master_server_address"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key} must not be empty")
    cfg.master_host_port  # noqa: B018 - validates host:port
    if cfg.protocol == "rdma" and not cfg.device_name:
        raise ConfigError("protocol='rdma' needs device_name (for example 'mlx5_0' or 'rxe0')")
    return cfg


def load(path: str | None = None, *, environ: dict[str, str] | None = None) -> ClientConfig:
    """Read the JSON file at ``path`` or ``$MOONCAKE_CONFIG_PATH``."""
    env = os.environ if environ is None else environ
    path = path or env.get(CONFIG_PATH_ENV)
    if not path:
        raise ConfigError(f"no config path given and {CONFIG_PATH_ENV} is not set")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a JSON object")
    return from_dict(data, environ=env)
