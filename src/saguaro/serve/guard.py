"""Checks before any route runs: the API key, and the size of the body.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware), so streamed responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from saguaro.serve.errors import APIError

OPEN_PATHS = ("/health",)  # for load balancers and probes, without a key


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None = None, max_body_bytes: int = 4 << 20):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen = 0

        async def limited_receive():  # bodies sent without a length are counted as they arrive
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes")
