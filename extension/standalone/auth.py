"""HTTP basic authentication for the standalone server, as A1111's `--api-auth user:pass`
(several pairs separated by commas): every HTTP request and websocket of the app — the API and
the page — must carry one of the pairs, or gets 401."""
from __future__ import annotations

import base64
import binascii
import secrets
from typing import List, Sequence

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def parse_credentials(text: str) -> List[str]:
    """"user:pass,user2:pass2" → ["user:pass", "user2:pass2"]; ValueError for a pair without
    a user or a password."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    for p in pairs:
        user, sep, password = p.partition(":")
        if not (user and sep and password):
            raise ValueError(f"--api-auth: '{user or p}…' is not USER:PASSWORD")
    if not pairs:
        raise ValueError("--api-auth: give USER:PASSWORD")
    return pairs


class BasicAuth:
    """ASGI middleware: 401 unless the Authorization header holds one of `credentials`."""

    def __init__(self, app: ASGIApp, credentials: Sequence[str]):
        self.app = app
        self.credentials = [c.encode("utf-8") for c in credentials]

    def _allowed(self, scope: Scope) -> bool:
        scheme, _, value = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        # every pair compared, in constant time: how long it takes says nothing about them
        return any([secrets.compare_digest(given, c) for c in self.credentials])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await PlainTextResponse("authentication required", status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="NetWeave"'})(
                scope, receive, send)
