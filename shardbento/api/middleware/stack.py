"""The changes the service makes to the middleware stack BentoML builds around its apps.

BentoML's app factories import their middleware classes by name each time they build an app, so each
swap here must happen before the server starts (service.py makes them at import):
- `traffic.timeout`'s middleware becomes FirstByteTimeout (timeout.py says why);
- OpenTelemetry's ASGI middleware opens no span per body chunk sent. Its default opens an "http send"
  span for every message the app sends: one per streamed token, which cost the service worker about a
  quarter of its CPU at 16 streams on 2 cores (a CPU the engine's threads need). The request's server
  span is kept, with its status code and duration; its "http receive" spans too.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from shardbento.api.middleware.timeout import replace_bentoml_timeout

logger = logging.getLogger(__name__)


def adjust_bentoml_stack() -> None:
    replace_bentoml_timeout()
    quiet_send_spans()


def quiet_send_spans() -> None:
    """Make every OpenTelemetry ASGI middleware built from now on skip its per-message send spans (an
    `exclude_spans` the builder passes itself wins); left as it is where the installed version has no
    `exclude_spans`."""
    from opentelemetry.instrumentation import asgi

    original = asgi.OpenTelemetryMiddleware
    if getattr(original, "quiet_sends", False):
        return
    if "exclude_spans" not in inspect.signature(original.__init__).parameters:
        logger.info("OpenTelemetry's ASGI middleware has no exclude_spans: it keeps a span per chunk sent")
        return

    class QuietSendTracing(original):  # type: ignore[misc,valid-type]
        quiet_sends = True

        def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("exclude_spans", ["send"])
            super().__init__(app, *args, **kwargs)

    asgi.OpenTelemetryMiddleware = QuietSendTracing  # type: ignore[misc]
