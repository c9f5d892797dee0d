"""What the CLI shows: views that read topics (the audit, dead letters, workflows) and
run no agent. Only :mod:`mesh.cli` imports this package."""
