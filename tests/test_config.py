import json

import pytest

from store.config import ConfigError, from_dict, load
from store.errors import ErrorCode
from store.units import GiB, MiB


def test_mooncake_keys_and_suffixes():
    cfg = from_dict({"local_hostname": "10.0.0.1", "metadata_server": "P2PHANDSHAKE",
                     "global_segment_size": "4gb", "local_buffer_size": "512mb",
                     "protocol": "RDMA", "device_name": "mlx5_0",
                     "master_server_address": "10.0.0.2:50051"}, environ={})
    assert cfg.global_segment_size == 4 * GiB and cfg.local_buffer_size == 512 * MiB
    assert cfg.protocol == "rdma" and cfg.master_host_port == ("10.0.0.2", 50051)


def test_aliases_and_ignored_keys():
    cfg = from_dict({"master_server_addr": "h:1", "rdma_devices": "rxe0", "tenant_id": "x"}, environ={})
    assert cfg.master_server_address == "h:1" and cfg.device_name == "rxe0"


def test_env_overrides_file(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps({"master_server_address": "a:1", "global_segment_size": 1024}))
    cfg = load(environ={"MOONCAKE_CONFIG_PATH": str(path), "MOONCAKE_MASTER": "b:2",
                        "MOONCAKE_GLOBAL_SEGMENT_SIZE": "16m"})
    assert cfg.master_server_address == "b:2" and cfg.global_segment_size == 16 * MiB


@pytest.mark.parametrize(("values", "needle"), [
    ({"protocol": "udp"}, "protocol"),
    ({"global_segment_size": "lots"}, "global_segment_size"),
    ({"global_segment_sizee": 1}, "unknown config key"),
    ({"master_server_address": "nohost"}, "host:port"),
    ({"local_hostname": ""}, "local_hostname"),
    ({"protocol": "rdma"}, "device_name"),
    ({"client_http_port": 70000}, "client_http_port"),
])
def test_bad_values_are_named(values, needle):
    with pytest.raises(ConfigError) as ei:
        from_dict(values, environ={})
    assert needle in str(ei.value)
    assert ei.value.code is ErrorCode.INVALID_PARAMS


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not set"):
        load(environ={})
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(str(bad), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.json"), environ={})
