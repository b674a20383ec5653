"""Hosted models as drivers: OpenAI-compatible endpoints (drivers/remote/client.py)."""
