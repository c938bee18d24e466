"""Scorer: tokenizes requests and attaches uncertainty and a predicted output length."""
