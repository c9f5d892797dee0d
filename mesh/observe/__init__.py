"""Observability: the audit topic (metrics and tracing build on the runtime's outcomes)."""
