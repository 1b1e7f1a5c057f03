import pytest

from runner.config.sizes import format_bytes, parse_size


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


def test_a_cap_above_what_the_machine_has_is_warned_about_naming_both_figures(tmp_path, caplog):
    import psutil

    from conftest import compose_config
    from runner.plan.hardware import detect_hardware

    cfg = compose_config("hardware=cpu", "max_memory.cpu=1000TiB")
    with caplog.at_level("WARNING", logger="runner.plan.hardware"):
        hardware = detect_hardware(cfg.hardware, cfg.placement.max_memory, tmp_path)
    assert hardware.get("cpu").budget == 1000 * 2**40  # honoured: the user may know better
    ram = format_bytes(psutil.virtual_memory().total)
    assert [r.getMessage() for r in caplog.records] == [
        f"max_memory.cpu: 1000.00 TiB is more than this machine has ({ram}); a plan that fills it will fail when "
        "it runs. Lower it, or leave it out to use what is there"]
    caplog.clear()
    sized = compose_config("hardware=a100_8x80gb", "max_memory.cpu=4TiB")  # a profile of another machine: no warning
    detect_hardware(sized.hardware, sized.placement.max_memory, tmp_path)
    assert caplog.records == []
