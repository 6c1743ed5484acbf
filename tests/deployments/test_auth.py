import pytest

from deployments.auth import Auth, AuthError


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
