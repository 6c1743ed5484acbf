"""API keys and short-lived client secrets for browsers.

A server holding an API key mints a client secret (`ek_...`) for a browser; the secret is
HMAC-signed with the deployment's signing key and carries its expiry, so every replica verifies
it without shared state. With no API keys configured the deployment is open (local development).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time


class AuthError(Exception):
    """The request is not authorised; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Auth:
    def __init__(self, api_keys: list[str], signing_key: bytes | None = None, ttl_s: int = 60, clock=time.time):
        self.api_keys = {k for k in api_keys if k}
        self.signing_key = signing_key or os.environ.get("INTERPLAY_SIGNING_KEY", "").encode() or secrets.token_bytes(32)
        self.ttl_s = ttl_s
        self.clock = clock

    @property
    def open(self) -> bool:
        return not self.api_keys

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.signing_key, body.encode(), hashlib.sha256).digest()[:24])

    def mint(self, ttl_s: int | None = None) -> dict:
        """A client secret in the Realtime API's shape: {"value", "expires_at"}."""
        expires = int(self.clock()) + int(ttl_s or self.ttl_s)
        body = f"{expires}.{secrets.token_hex(8)}"
        return {"value": f"ek_{body}.{self._sign(body)}", "expires_at": expires}

    def check_api_key(self, header: str | None) -> None:
        """Only a real API key (not a client secret) may mint secrets or call server-side APIs."""
        if self.open:
            return
        token = self._bearer(header)
        if not any(hmac.compare_digest(token, k) for k in self.api_keys):
            raise AuthError("invalid API key")

    def check(self, header: str | None) -> None:
        """An API key or an unexpired client secret; raises AuthError otherwise."""
        if self.open:
            return
        token = self._bearer(header)
        if token.startswith("ek_"):
            self._check_secret(token[3:])
        elif not any(hmac.compare_digest(token, k) for k in self.api_keys):
            raise AuthError("invalid API key")

    def _check_secret(self, token: str) -> None:
        try:
            expires, nonce, signature = token.split(".")
            expires_at = int(expires)
        except ValueError:
            raise AuthError("malformed client secret") from None
        if not hmac.compare_digest(signature, self._sign(f"{expires}.{nonce}")):
            raise AuthError("invalid client secret")
        if expires_at < self.clock():
            raise AuthError("client secret expired")

    @staticmethod
    def _bearer(header: str | None) -> str:
        if not header:
            raise AuthError("missing Authorization header (expected 'Bearer <key>')")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header must be 'Bearer <key>'")
        return token.strip()
