from __future__ import annotations

import pytest

from ingress.context import parse_networks
from ingress.middleware import _is_trusted_proxy


def test_trusted_proxies_are_networks_and_the_default_is_the_local_nginx() -> None:
    default = parse_networks("127.0.0.1/32,::1/128")
    assert _is_trusted_proxy("127.0.0.1", default)
    assert _is_trusted_proxy("::1", default)
    assert _is_trusted_proxy("::ffff:127.0.0.1", default)  # an IPv4 peer on a dual-stack socket
    for outsider in ("127.0.0.2", "10.0.0.1", "::2", "unknown", ""):
        assert not _is_trusted_proxy(outsider, default)
    lan = parse_networks(" 10.1.0.0/16 , 192.0.2.7 ")
    assert _is_trusted_proxy("10.1.200.3", lan)
    assert _is_trusted_proxy("192.0.2.7", lan)
    assert not _is_trusted_proxy("127.0.0.1", lan)
    assert parse_networks("") == ()  # trust nobody: X-Forwarded-For is never believed


@pytest.mark.parametrize("bad", ["not-an-address", "10.0.0.1/33", "10.0.0.1/8"])
def test_a_malformed_trusted_proxies_setting_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="CLEANLEDGER_TRUSTED_PROXIES"):
        parse_networks(bad)
