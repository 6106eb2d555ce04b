"""Optional API-key check: with SHARDBENTO_API_KEY set, every path but probes, /metrics and the static
playground page needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from shardbento.api.errors import ASGIApp
from shardbento.api.middleware.limits import reject_unread
from shardbento.api.ui import PUBLIC_PATHS as UI_PATHS
from shardbento.errors import Unauthorized
from shardbento.settings import Settings

logger = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/health", "/version"})
# The playground page is static and holds no secret; the key typed into it goes with every API call.
OPEN_PATHS = PROBE_PATHS | UI_PATHS
METRICS_PATH = "/metrics"


class ApiKeyMiddleware:
    """Answers 401 in OpenAI's shape unless `Authorization: Bearer <key>` matches (constant time).

    The key is read once when the app is built and never logged; only whether a key was sent is.
    """

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        settings = settings or Settings.from_env()
        self._key = settings.api_key.encode() if settings.api_key else None
        self._open_paths = OPEN_PATHS if settings.auth_metrics else OPEN_PATHS | {METRICS_PATH}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._key is None or scope["type"] != "http" or scope.get("path") in self._open_paths:
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        logger.info("rejected %s %s: %s", scope.get("method"), scope.get("path"), problem)
        await reject_unread(Unauthorized(problem), scope, receive, send)

    def _problem(self, scope: dict[str, Any]) -> str | None:
        headers = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        if not headers:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        scheme, _, token = headers[0].partition(b" ")
        # compare_digest even for a wrong scheme, so the time taken says nothing about the key
        matches = hmac.compare_digest(token.strip(), self._key or b"")
        if scheme.lower() != b"bearer" or not matches:
            return "invalid API key"
        return None
