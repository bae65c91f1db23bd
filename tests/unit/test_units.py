import pytest

from planner.errors import InputError
from planner.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text,expected",
    [("24GiB", 24 * 1024**3), ("24GB", 24_000_000_000), ("24 gib", 24 * 1024**3), ("512MiB", 512 * 1024**2),
     ("1.5GiB", int(1.5 * 1024**3)), ("1073741824", 1024**3), (1024, 1024), ("0", 0), ("2TB", 2 * 10**12)],
)
def test_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["-1GiB", "lots", "12XB", -5, float("nan"), True, "GiB", None])
def test_parse_rejects_with_field_name(bad):
    with pytest.raises(InputError, match="memory"):
        parse_bytes(bad, field="memory")


def test_format():
    assert format_bytes(24 * 1024**3) == "24.0 GiB"
    assert format_bytes(1536 * 1024**2, precision=2) == "1.50 GiB"
    assert format_bytes(512) == "512 B"
