import pytest

from store.errors import ErrorCode, StoreError, code_of, is_documented
from store.units import GiB, MiB, parse_size


def test_error_numbers_match_mooncake():
    assert ErrorCode.NO_AVAILABLE_HANDLE == -200
    assert ErrorCode.INVALID_PARAMS == -600
    assert ErrorCode.OBJECT_NOT_FOUND == -704
    assert ErrorCode.OBJECT_HAS_LEASE == -706
    assert ErrorCode.LEASE_EXPIRED == -707
    assert ErrorCode.TRANSFER_FAIL == -800
    assert ErrorCode.RPC_TIMEOUT == -901


def test_store_error_carries_code():
    err = StoreError(-704, "key k1")
    assert err.code is ErrorCode.OBJECT_NOT_FOUND
    assert "OBJECT_NOT_FOUND (-704)" in str(err) and "k1" in str(err)
    assert is_documented(-706) and not is_documented(-12345)
    assert code_of(-12345) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("4gb", 4 * GiB), ("4GB", 4 * GiB), ("16m", 16 * MiB), ("512 MB", 512 * MiB),
    ("1024", 1024), (0, 0), ("1.5g", int(1.5 * GiB)), ("7b", 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "4xb", "-1", -5, "gb", True, 1.5, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)
