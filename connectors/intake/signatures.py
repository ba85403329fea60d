"""Webhook signatures: base64 HMAC-SHA256 of the raw request body, keyed with the shared secret.

Shopify sends it in ``X-Shopify-Hmac-Sha256`` and WooCommerce in ``X-WC-Webhook-Signature``; both use
the same construction. The HMAC is over the bytes as received: parsing and re-serialising the JSON
first would change them and fail every check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SHOPIFY_HEADER = "X-Shopify-Hmac-Sha256"
WOOCOMMERCE_HEADER = "X-WC-Webhook-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature a platform would send for ``body``."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def verify(secret: str, body: bytes, signature: str | None) -> bool:
    """True only for a present signature that matches; compared in constant time."""
    if not signature:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), signature.strip().encode())
