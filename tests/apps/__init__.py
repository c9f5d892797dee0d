"""Agent apps the tests run, in-process or as `mesh run` subprocesses.

Topic names carry a per-test prefix from ``MESH_TEST_PREFIX`` so tests sharing one
broker never see each other's events.
"""
