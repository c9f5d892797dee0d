"""Reference agents; each is deployable alone with ``mesh run agents.<module>:<agent>``."""
