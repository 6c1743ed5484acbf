import base64
import json

import pytest

from deployments.auth import Auth, AuthError, Grant, tenant_of


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
    assert auth.check("Bearer sk-1") == Grant(owner=None, config=None, tenant=tenant_of("sk-1"))
    first, second = auth.mint()["value"], auth.mint()["value"]
    a, b = auth.check(f"Bearer {first}"), auth.check(f"Bearer {second}")
    assert a.owner and b.owner and a.owner != b.owner and a.config is None
    assert auth.check(f"Bearer {first}").owner == a.owner  # stable: any replica computes the same


def test_secrets_count_against_the_key_that_minted_them_and_never_carry_the_key():
    auth = Auth(["sk-alice", "sk-bob"], signing_key=b"k")
    alice = auth.check_api_key("Bearer sk-alice")
    assert alice == tenant_of("sk-alice") != auth.check_api_key("Bearer sk-bob")
    assert "sk-alice" not in alice
    secret = auth.mint(config=None, tenant=alice)["value"]
    assert "sk-alice" not in secret
    assert auth.check(f"Bearer {secret}").tenant == alice
    # the tenant is signed: a holder cannot move its secret onto another key's quota
    expires, nonce, tenant, sig = secret[3:].split(".")
    with pytest.raises(AuthError):
        auth.check(f"Bearer ek_{expires}.{nonce}.{tenant_of('sk-bob')}.{sig}")
    with pytest.raises(ValueError):
        auth.mint(tenant="not.a.tenant")
    assert Auth([]).check_api_key(None) == "open"


def test_a_bound_config_rides_in_the_secret_and_cannot_be_altered():
    config = {"type": "realtime", "instructions": "be brief \u00e9", "audio": {"output": {"voice": "x"}}}
    auth = Auth(["sk-1"], signing_key=b"k")
    secret = auth.mint(config=config)["value"]
    assert secret.count(".") == 4
    assert Auth(["sk-2"], signing_key=b"k").check(f"Bearer {secret}").config == config  # another replica, stateless
    expires, nonce, tenant, body, sig = secret[3:].split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"type": "realtime", "instructions": "evil"}).encode()).rstrip(b"=").decode()
    for token in (f"ek_{expires}.{nonce}.{tenant}.{forged}.{sig}", f"ek_{expires}.{nonce}.{tenant}.{sig}", f"ek_{int(expires) + 999}.{nonce}.{tenant}.{body}.{sig}"):
        with pytest.raises(AuthError, match="invalid client secret"):
            auth.check(f"Bearer {token}")


def test_secrets_of_the_format_before_tenants_are_refused():
    """Before tenants, a secret was expiry.nonce[.config].signature: the four-part form, signed
    alike, must not pass as a new secret whose config part is read as its tenant (it would lose
    its bound config)."""
    import hashlib
    import hmac

    auth = Auth(["sk-1"], signing_key=b"k", clock=lambda: 1000.0)
    config = base64.urlsafe_b64encode(b'{"type":"realtime"}').rstrip(b"=").decode()
    for body in ("1060.0123456789abcdef", f"1060.0123456789abcdef.{config}"):
        sig = base64.urlsafe_b64encode(hmac.new(b"k", body.encode(), hashlib.sha256).digest()[:24]).rstrip(b"=").decode()
        with pytest.raises(AuthError, match="malformed"):
            auth.check(f"Bearer ek_{body}.{sig}")


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
