"""OpenAI-compatible HTTP gateway: auth, validation, admission, AMQP publish and reply streaming."""

from __future__ import annotations

from services.gateway.app import create_app, serve

__all__ = ["create_app", "serve"]
