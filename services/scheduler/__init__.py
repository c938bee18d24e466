"""Scheduler: fair, uncertainty-aware queues in Redis and dispatch to worker pools."""
