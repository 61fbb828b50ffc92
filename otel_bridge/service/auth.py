"""Who may talk to the service's listeners, and over what.

Bearer tokens, as the Collector's `bearertokenauth` extension takes them
(`Authorization: Bearer <token>` over HTTP, `authorization` metadata over
gRPC), and TLS from a PEM certificate and key, for every listener.
"""

from __future__ import annotations

import hmac
import ssl
from pathlib import Path
from typing import Optional

__all__ = ["bearer_matches", "server_tls"]


def bearer_matches(value: Optional[str], token: Optional[str]) -> bool:
    """Whether an `Authorization` value carries `token` (None: none is
    required). Whitespace around either is not part of the token, and the
    comparison takes the same time whatever the value."""
    if token is None:
        return True
    scheme, _, given = (value or "").strip().partition(" ")
    return hmac.compare_digest(given.strip().encode(), token.strip().encode()) and (
        scheme.lower() == "bearer")


def server_tls(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server TLS context, TLS 1.2 at least."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
