"""Schemathesis hooks for the contract test (dataplane/tests/contract.rs).

They make spec-valid requests reach the gateway's real paths instead of
bouncing off unknown names:

- every request carries a fresh HS256 token for one of a crowd of buyers (an
  order lookup carries its owner's token);
- positive cases mostly name the live sale, its SKUs, and orders this run
  won, and callbacks mostly pay those orders in the sale's currency;
- every callback that has a JSON body and an X-Signature header is signed
  with the payment provider's Ed25519 key, so it gets past the signature;
- a connection answered 101 (the WebSocket handshake) is closed, not reused
  for the next HTTP request: it speaks WebSocket from then on.

Negative cases are left as generated (apart from the token and signature), so
the gateway's refusals are exercised too. Configuration comes from the
environment the test sets: FLASHSALE_TOKEN_SECRET, FLASHSALE_SALE,
FLASHSALE_SKUS (comma-separated), FLASHSALE_PRICE, FLASHSALE_CURRENCY,
FLASHSALE_PAYMENT_KEY (the base64 32-byte Ed25519 seed).
"""

import base64
import decimal
import hashlib
import hmac
import json
import os
import random
import threading
import time

import requests.adapters
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from schemathesis.core import NotSet

SECRET = os.environ["FLASHSALE_TOKEN_SECRET"].encode()
SALE = os.environ["FLASHSALE_SALE"]
SKUS = os.environ["FLASHSALE_SKUS"].split(",")
PRICE = decimal.Decimal(os.environ["FLASHSALE_PRICE"])
CURRENCY = os.environ["FLASHSALE_CURRENCY"]
PAYMENT_KEY = Ed25519PrivateKey.from_private_bytes(
    base64.b64decode(os.environ["FLASHSALE_PAYMENT_KEY"])
)
BUYERS = 300

PURCHASE = "/v1/sales/{sale}/purchase"
ORDER = "/v1/orders/{id}"
CALLBACK = "/v1/payments/callback"

# Orders this run won: order id -> (buyer, quantity). Workers are threads.
_won = {}
_lock = threading.Lock()
_rng = random.Random()


_send = requests.adapters.HTTPAdapter.send


def _send_closing_upgrades(self, request, *args, **kwargs):
    response = _send(self, request, *args, **kwargs)
    if response.status_code == 101 and response.raw.connection is not None:
        response.raw.connection.close()
    return response


requests.adapters.HTTPAdapter.send = _send_closing_upgrades


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token(user: str) -> str:
    """An HS256 JWT as the shop's login issues it, valid for an hour."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = _b64url(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    signed = f"{header}.{claims}".encode()
    signature = _b64url(hmac.new(SECRET, signed, hashlib.sha256).digest())
    return f"{header}.{claims}.{signature}"


def _subject(case) -> str | None:
    """The buyer whose token the case carries."""
    value = (case.headers or {}).get("Authorization", "")
    parts = value.removeprefix("Bearer ").split(".")
    if len(parts) != 3:
        return None
    claims = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        return json.loads(base64.urlsafe_b64decode(claims)).get("sub")
    except ValueError:
        return None


def _positive(case) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


def _known_order():
    with _lock:
        if not _won:
            return None
        order = _rng.choice(list(_won))
        return order, _won[order]


@schemathesis.auth(refresh_interval=None)
class Buyers:
    """A token per request: a random buyer of the crowd, or the owner of the
    order the request looks up."""

    def get(self, case, ctx):
        order = (case.path_parameters or {}).get("id")
        with _lock:
            owner = _won.get(order, (None,))[0] if isinstance(order, str) else None
        return token(owner or f"buyer-{_rng.randrange(BUYERS)}")

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


@schemathesis.hook
def map_case(context, case):
    if not _positive(case):
        return case
    path = case.operation.path
    params = case.path_parameters
    if params and "sale" in params and _rng.random() < 0.9:
        params["sale"] = SALE
    body = case.body
    if path == PURCHASE and isinstance(body, dict) and _rng.random() < 0.9:
        body["sku"] = _rng.choice(SKUS)
        if _rng.random() < 0.7:
            body["quantity"] = 1
    if path == ORDER and params and _rng.random() < 0.8:
        known = _known_order()
        if known:
            params["id"] = known[0]
    if path == CALLBACK and isinstance(body, dict) and _rng.random() < 0.8:
        known = _known_order()
        if known:
            order, (_, quantity) = known
            body["orderId"] = order
            body["currency"] = CURRENCY
            body["amount"] = str(PRICE * quantity)
    return case


@schemathesis.hook
def before_call(context, case, kwargs):
    """Signs a callback's exact bytes: the body is serialized here, once."""
    if case.operation.path != CALLBACK or isinstance(case.body, NotSet):
        return
    headers = case.headers or {}
    if "X-Signature" not in headers or "json" not in (case.media_type or ""):
        return
    try:
        raw = json.dumps(case.body).encode()
    except (TypeError, ValueError):
        return
    kwargs["data"] = raw
    headers["X-Signature"] = base64.b64encode(PAYMENT_KEY.sign(raw)).decode()
    case.headers = headers


@schemathesis.hook
def after_call(context, case, response):
    """Remembers the orders this run won, for lookups and payments."""
    if case.operation.path != PURCHASE or response.status_code != 202:
        return
    buyer = _subject(case)
    try:
        order = response.json()["orderId"]
    except (ValueError, KeyError, TypeError):
        return
    quantity = case.body.get("quantity", 1) if isinstance(case.body, dict) else 1
    if buyer:
        with _lock:
            _won.setdefault(order, (buyer, quantity))
