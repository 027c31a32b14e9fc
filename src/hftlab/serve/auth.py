"""API keys: ``hft_<key id>_<secret>``. Only a salted SHA-256 of the secret is stored; the key
id finds the row and the digests are compared in constant time, so neither a timing nor a
stolen database reveals a key."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from hftlab.serve.store import Store

PREFIX = "hft"
_DUMMY_SALT = "0" * 32


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def create_key(store: Store, tenant: str) -> str:
    """Add ``tenant`` (if new) and a new key for it; the key is returned once, never stored."""
    store.add_tenant(tenant)
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(24), secrets.token_hex(16)
    store.add_key(tenant, key_id, salt, _digest(salt, secret))
    return f"{PREFIX}_{key_id}_{secret}"


def tenant_for_key(store: Store, key: str) -> str | None:
    """The tenant a key belongs to, or None for a malformed, unknown or wrong key."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    row = store.key(key_id) if prefix == PREFIX and key_id and secret else None
    salt, expected = (row["salt"], row["digest"]) if row else (_DUMMY_SALT, "")
    # compared even when no row matched, so that both paths cost one hash
    match = hmac.compare_digest(_digest(salt, secret), expected or "x" * 64)
    return row["tenant"] if row and match else None
