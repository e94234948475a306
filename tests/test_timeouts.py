"""Every test has a time limit (issue 25): a hung test fails with a traceback instead of eating CI's time."""

from conftest import SLOW_TIMEOUT_S


def _limit(item, config) -> float:
    marker = item.get_closest_marker("timeout")
    return marker.args[0] if marker else float(config.getini("timeout"))


def test_every_collected_test_has_a_limit(request):
    config = request.config
    assert float(config.getini("timeout")) > 0, "pyproject.toml sets no pytest-timeout default"
    for item in request.session.items:
        assert _limit(item, config) > 0, item.nodeid
        if item.get_closest_marker("slow"):
            assert _limit(item, config) >= SLOW_TIMEOUT_S, f"{item.nodeid}: an end-to-end test with a short limit"
