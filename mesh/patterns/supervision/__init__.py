"""Supervision: workers that quarantine themselves when they keep failing and a
supervisor that reassigns their work."""
