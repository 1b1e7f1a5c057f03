import pytest

from runner.sizes import format_bytes, parse_size


@pytest.mark.parametrize("text, expected", [
    ("500MB", 500 * 10**6),
    ("10GiB", 10 * 2**30),
    ("1.5GiB", 1610612736),
    ("4 KiB", 4096),
    ("0B", 0),
    ("2TB", 2 * 10**12),
])
def test_parse_size_units_have_their_proper_meaning(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["10GX", "-1GiB", "100", "GiB", "1.2.3GB", "ten GB"])
def test_parse_size_rejects_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_a_size_past_any_device_is_one_config_line_not_an_overflow():
    from conftest import compose_config
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^max_memory.cpu: 9{24}\.\.\.: 400 digits is past any device"):
        compose_config("max_memory.cpu=" + "9" * 400 + "GB")
    with pytest.raises(ConfigError, match=r"^max_memory.cpu: 1000000000TiB is past any device \(over 1 EiB\)"):
        compose_config("max_memory.cpu=1000000000TiB")
    assert parse_size("1024TiB") == 2**50  # a big cluster's disk is fine
