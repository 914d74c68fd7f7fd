"""Provider webhooks -> canonical ``message.*`` events (SPEC sections 2, 5, 7).

The HTTP layer calls :func:`handle` for ``POST /webhooks/{provider}``::

    result = handle(provider, request.headers, body, request.content_type, config, now=request_received_at)  # epoch seconds, read by the HTTP layer

and then

* produces every ``result.events`` item to ``provider-events`` (key ``message_id``);
  they are canonical events in raw contract form (``occurred_at`` RFC 3339 ``Z``);
* produces every ``result.unknown`` item (``{"provider", "reason", "payload"}``) to
  ``dead-letters`` (nothing is dropped silently);
* when ``result.reply`` is set (SNS ``SubscriptionConfirmation``), logs it and answers
  200 with it as the JSON body; sendtrail never fetches the ``subscribe_url`` itself,
  an operator confirms by opening it;
* answers 2xx only after the produce succeeded (providers retry on non-2xx; every
  event_id is derived from the provider's own ids, so retries are idempotent);
* on :class:`WebhookError` answers ``e.status`` with
  ``{"error": {"code": e.code, "message": e.message}}`` and produces nothing.

Body size limits are the HTTP layer's job (``SENDTRAIL_MAX_BODY_BYTES``).
The module is pure: no environment, clock, network or Kafka.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from . import mailgun, postmark, sendgrid, ses
from .common import ENV_VARS, WebhookConfig, WebhookError, WebhookResult, normalize_headers

__all__ = ["PROVIDERS", "Provider", "WebhookConfig", "WebhookError", "WebhookResult", "handle",
           "ENV_VARS"]


@dataclass(frozen=True)
class Provider:
    name: str
    env_var: str                       # the setting that configures its secret
    content_types: tuple[str, ...]     # accepted media types
    handle: Callable[[dict, bytes, str, WebhookConfig, float], WebhookResult]  # headers already normalized

    def configured(self, config: WebhookConfig) -> bool:
        return bool({
            "sendgrid": config.sendgrid_public_key,
            "mailgun": config.mailgun_signing_key,
            "ses": config.ses_cert_pem,
            "postmark": config.postmark_auth,
        }[self.name])


PROVIDERS: dict[str, Provider] = {
    module.NAME: Provider(module.NAME, ENV_VARS[module.NAME], module.CONTENT_TYPES, module.handle)
    for module in (sendgrid, mailgun, ses, postmark)
}


def handle(provider: str, headers: Mapping[str, str], body: bytes, content_type: str,
           config: WebhookConfig, now: float) -> WebhookResult:
    """Verify and normalize one webhook request; raises :class:`WebhookError` (and nothing else)."""
    spec = PROVIDERS.get(provider)
    if spec is None:
        raise WebhookError(404, "unknown_provider",
                           f"unknown webhook provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if not isinstance(body, bytes):
        raise WebhookError(400, "malformed_body", "webhook body must be bytes")
    return spec.handle(normalize_headers(headers), body, content_type or "", config, float(now))
