"""Resilience: dead letters and their replay (retry topics, breakers and fallbacks
build on the same records)."""
