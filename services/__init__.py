"""Fairway: fair, uncertainty-aware multi-tenant LLM serving over RabbitMQ and Redis."""

__version__ = "0.1.0"
