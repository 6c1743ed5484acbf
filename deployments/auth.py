"""API keys and short-lived client secrets for browsers.

A server holding an API key mints a client secret (`ek_...`) for a browser; the secret is
HMAC-signed with the deployment's signing key and carries its expiry, and may carry a session
config bound to it (compact JSON, base64url), so every replica verifies it and learns its config
without shared state. `check` answers with a `Grant`: the bound config, if any, and the call
owner (a hash of the secret; None for an API key holder, who may act on any call). With no API
keys configured the deployment is open (local development): anyone passes, and a valid secret
still brings its config and owner.

Every grant also names its `tenant`, the party whose quotas a call counts against: an API key's
own id (a hash of the key, never the key), carried inside each secret that key mints, so a key
holder cannot escape its quotas by minting more secrets; "open" for everyone on an open deployment.

Secret formats: `ek_<expires>.<nonce>.<tenant>.<signature>` (no config) and
`ek_<expires>.<nonce>.<tenant>.<config>.<signature>`; the signature covers everything before it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass

# Secrets travel in headers, and WebSocket servers (websockets, behind uvicorn) refuse header
# lines over 8 KiB: a bound config must leave room for the rest of the secret and the header name.
MAX_BOUND_CONFIG_CHARS = 6000
MAX_TOKEN_CHARS = MAX_BOUND_CONFIG_CHARS + 200


class AuthError(Exception):
    """The request is not authorised; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


OPEN_TENANT = "open"


@dataclass(frozen=True)
class Grant:
    """What a checked credential allows: `owner` of the calls it makes (None: any call), the
    session `config` bound to it (None: the caller's own; else a ceiling the session may narrow,
    never widen), and the `tenant` its quotas count against."""

    owner: str | None = None
    config: dict | None = None
    tenant: str = OPEN_TENANT


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_config(config: dict) -> str:
    """A session config as it rides in a secret; ValueError if it is too large to."""
    encoded = _b64(json.dumps(config, separators=(",", ":")).encode())
    if len(encoded) > MAX_BOUND_CONFIG_CHARS:
        raise ValueError(f"session config too large to bind to a client secret (at most about {MAX_BOUND_CONFIG_CHARS * 3 // 4} bytes of JSON)")
    return encoded


def owner_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def tenant_of(api_key: str) -> str:
    """An API key's quota id: a hash of it, so the key itself is never kept or logged."""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


def is_tenant(text: str) -> bool:
    return text == OPEN_TENANT or (len(text) == 20 and text.startswith("key-") and all(c in "0123456789abcdef" for c in text[4:]))


class Auth:
    def __init__(self, api_keys: list[str], signing_key: bytes | None = None, ttl_s: int = 60, clock=time.time):
        self.api_keys = [k.encode() for k in dict.fromkeys(api_keys) if k]
        self.signing_key = signing_key or os.environ.get("INTERPLAY_SIGNING_KEY", "").encode() or secrets.token_bytes(32)
        self.ttl_s = ttl_s
        self.clock = clock

    @property
    def open(self) -> bool:
        return not self.api_keys

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.signing_key, body.encode(), hashlib.sha256).digest()[:24])

    def mint(self, ttl_s: int | None = None, config: dict | None = None, tenant: str = OPEN_TENANT) -> dict:
        """A client secret in the Realtime API's shape: {"value", "expires_at"}, counting against
        `tenant`'s quotas (the minting key's), with `config` (a validated session config) bound to
        it when given; ValueError if it is too large."""
        if not is_tenant(tenant):
            raise ValueError(f"not a tenant id: {tenant!r}")
        expires = int(self.clock()) + int(ttl_s or self.ttl_s)
        body = f"{expires}.{secrets.token_hex(8)}.{tenant}"
        if config is not None:
            body += "." + encode_config(config)
        return {"value": f"ek_{body}.{self._sign(body)}", "expires_at": expires}

    def check_api_key(self, header: str | None) -> str:
        """Only a real API key (not a client secret) may mint secrets or call server-side APIs;
        the key's tenant ("open" on an open deployment)."""
        if self.open:
            return OPEN_TENANT
        token = self._bearer(header)
        if not self._is_key(token):
            raise AuthError("invalid API key")
        return tenant_of(token)

    def check(self, header: str | None, allow_expired: bool = False) -> Grant:
        """An API key or an unexpired client secret (expired too with `allow_expired`: its holder
        may still end the calls it made); raises AuthError otherwise."""
        if self.open:
            try:
                token = self._bearer(header)
                return self._check_secret(token, allow_expired) if token.startswith("ek_") else Grant()
            except AuthError:
                return Grant()  # open: whatever else came is no credential, and needs none
        token = self._bearer(header)
        if token.startswith("ek_"):
            return self._check_secret(token, allow_expired)
        if not self._is_key(token):
            raise AuthError("invalid API key")
        return Grant(tenant=tenant_of(token))

    def _is_key(self, token: str) -> bool:
        given = token.encode()
        return any(hmac.compare_digest(given, k) for k in self.api_keys)

    def _check_secret(self, token: str, allow_expired: bool) -> Grant:
        parts = token[3:].split(".")
        if len(parts) not in (4, 5) or len(token) > MAX_TOKEN_CHARS:
            raise AuthError("malformed client secret")
        *signed, signature = parts
        try:
            expires_at = int(signed[0])
        except ValueError:
            raise AuthError("malformed client secret") from None
        if not is_tenant(signed[2]):  # also refuses the formats before tenants, whose third part was a config
            raise AuthError("malformed client secret")
        if not hmac.compare_digest(signature.encode(), self._sign(".".join(signed)).encode()):
            raise AuthError("invalid client secret")
        if expires_at < self.clock() and not allow_expired:
            raise AuthError("client secret expired")
        config = None
        if len(signed) == 4:
            try:  # signed by us, so well-formed unless the signing key leaked
                config = json.loads(_unb64(signed[3]))
            except (ValueError, binascii.Error):
                raise AuthError("malformed client secret") from None
        return Grant(owner=owner_of(token), config=config, tenant=signed[2])

    @staticmethod
    def _bearer(header: str | None) -> str:
        if not header:
            raise AuthError("missing Authorization header (expected 'Bearer <key>')")
        if not header.isascii() or not header.isprintable() or len(header) > MAX_TOKEN_CHARS + 16:
            raise AuthError("Authorization header must be 'Bearer <key>' in printable ASCII")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header must be 'Bearer <key>'")
        return token.strip()


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Whether a request carrying `Origin: origin` may act (CORS does not protect a WebSocket or a
    no-preflight POST: a page on any site could otherwise drive a call with the visitor's network
    position). No Origin (not a browser), the page's own origin (the request's `Host`), a
    loopback page (any port), or one of `allowed` ("*" for any) may; anything else may not."""
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in (a.strip().rstrip("/").lower() for a in allowed):
        return True
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        return False  # "null" (a sandboxed frame, a file), or not an origin at all
    if host is not None and rest == host.strip().lower():
        return True
    name = rest.rsplit(":", 1)[0] if not rest.endswith("]") else rest
    name = name.strip("[]")
    from .config import is_loopback

    return is_loopback(name)
