import base64
import json

import pytest

from deployments.auth import Auth, AuthError, Grant


def test_open_when_no_keys():
    Auth([]).check(None)


def test_api_key_and_client_secret():
    now = [1000.0]
    auth = Auth(["sk-1"], ttl_s=60, clock=lambda: now[0])
    auth.check("Bearer sk-1")
    secret = auth.mint()
    assert secret["expires_at"] == 1060
    auth.check(f"Bearer {secret['value']}")
    now[0] = 1061
    with pytest.raises(AuthError, match="expired"):
        auth.check(f"Bearer {secret['value']}")


@pytest.mark.parametrize("header", [None, "", "sk-1", "Basic sk-1", "Bearer ", "Bearer sk-2", "Bearer ek_garbage", "Bearer ek_1.2.3"])
def test_bad_credentials_are_refused(header):
    with pytest.raises(AuthError) as info:
        Auth(["sk-1"]).check(header)
    assert info.value.status == 401


def test_secret_from_another_deployment_is_refused():
    secret = Auth(["sk-1"], signing_key=b"a").mint()["value"]
    with pytest.raises(AuthError, match="invalid client secret"):
        Auth(["sk-1"], signing_key=b"b").check(f"Bearer {secret}")


def test_client_secret_cannot_mint_more_secrets():
    auth = Auth(["sk-1"])
    with pytest.raises(AuthError):
        auth.check_api_key(f"Bearer {auth.mint()['value']}")
    auth.check_api_key("Bearer sk-1")


@pytest.mark.parametrize("header", ["Bearer sk-\u00e9", "Bearer \u00e9", "B\u00e9arer sk-1", "Bearer ek_\u00ff.1.2", "Bearer sk-1\x00", "Bearer " + "x" * 100_000])
def test_non_ascii_or_huge_credentials_are_refused_not_crashed(header):
    """Starlette hands headers over as latin-1 text: a non-ASCII one must be a 401, not a
    TypeError from comparing it (compare_digest refuses non-ASCII str)."""
    for auth in (Auth(["sk-1"]), Auth(["sk-\u00e9"])):
        with pytest.raises(AuthError) as info:
            auth.check(header)
        assert info.value.status == 401
        with pytest.raises(AuthError):
            auth.check_api_key(header)
    assert Auth([]).check(header) == Grant()  # open: nothing needed, nothing breaks


def test_a_key_grants_any_call_and_a_secret_its_own():
    auth = Auth(["sk-1"])
    assert auth.check("Bearer sk-1") == Grant(owner=None, config=None)
    first, second = auth.mint()["value"], auth.mint()["value"]
    a, b = auth.check(f"Bearer {first}"), auth.check(f"Bearer {second}")
    assert a.owner and b.owner and a.owner != b.owner and a.config is None
    assert auth.check(f"Bearer {first}").owner == a.owner  # stable: any replica computes the same


def test_a_bound_config_rides_in_the_secret_and_cannot_be_altered():
    config = {"type": "realtime", "instructions": "be brief \u00e9", "audio": {"output": {"voice": "x"}}}
    auth = Auth(["sk-1"], signing_key=b"k")
    secret = auth.mint(config=config)["value"]
    assert secret.count(".") == 3
    assert Auth(["sk-2"], signing_key=b"k").check(f"Bearer {secret}").config == config  # another replica, stateless
    expires, nonce, body, sig = secret[3:].split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"type": "realtime", "instructions": "evil"}).encode()).rstrip(b"=").decode()
    for token in (f"ek_{expires}.{nonce}.{forged}.{sig}", f"ek_{expires}.{nonce}.{sig}", f"ek_{int(expires) + 999}.{nonce}.{body}.{sig}"):
        with pytest.raises(AuthError, match="invalid client secret"):
            auth.check(f"Bearer {token}")


def test_an_old_format_secret_still_verifies():
    """Secrets minted before configs could be bound (three parts, signature over expiry.nonce)."""
    import hashlib
    import hmac

    auth = Auth(["sk-1"], signing_key=b"k", clock=lambda: 1000.0)
    body = "1060.0123456789abcdef"
    sig = base64.urlsafe_b64encode(hmac.new(b"k", body.encode(), hashlib.sha256).digest()[:24]).rstrip(b"=").decode()
    grant = auth.check(f"Bearer ek_{body}.{sig}")
    assert grant.config is None and grant.owner


def test_an_oversized_config_cannot_be_bound():
    with pytest.raises(ValueError, match="too large"):
        Auth(["sk-1"]).mint(config={"type": "realtime", "instructions": "x" * 10_000})


def test_an_expired_secret_may_still_end_its_own_calls():
    now = [1000.0]
    auth = Auth(["sk-1"], ttl_s=60, clock=lambda: now[0])
    secret = auth.mint()["value"]
    owner = auth.check(f"Bearer {secret}").owner
    now[0] = 2000.0
    with pytest.raises(AuthError, match="expired"):
        auth.check(f"Bearer {secret}")
    assert auth.check(f"Bearer {secret}", allow_expired=True).owner == owner
