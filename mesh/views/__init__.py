"""What the CLI shows: views that read topics (the audit, dead letters, workflows,
worker statuses) and run no agent. Only :mod:`mesh.cli` imports this package."""
