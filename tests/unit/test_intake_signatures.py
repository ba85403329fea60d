"""Webhook HMACs: good, bad and missing signatures, checked over the raw bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac

from connectors.intake import signatures

BODY = b'{"id": 5923157360923, "total_price": "190.95"}'
SECRET = "shpss_0123456789abcdef"


def test_sign_is_base64_hmac_sha256_of_the_raw_body() -> None:
    expected = base64.b64encode(hmac.new(SECRET.encode(), BODY, hashlib.sha256).digest()).decode()
    assert signatures.sign(SECRET, BODY) == expected


def test_good_signature_verifies() -> None:
    assert signatures.verify(SECRET, BODY, signatures.sign(SECRET, BODY))


def test_bad_signatures_do_not_verify() -> None:
    good = signatures.sign(SECRET, BODY)
    assert not signatures.verify("another-secret", BODY, good)
    assert not signatures.verify(SECRET, BODY + b" ", good)  # re-serialised JSON is not the signed body
    assert not signatures.verify(SECRET, BODY, good[:-4] + "AAA=")
    assert not signatures.verify(SECRET, BODY, "not base64 at all é")


def test_missing_signature_does_not_verify() -> None:
    assert not signatures.verify(SECRET, BODY, None)
    assert not signatures.verify(SECRET, BODY, "")
