"""The runtime: what runs an agent. :mod:`.runner` consumes and commits, :mod:`.host`
runs many agents in one process; one record's fate (retry, dead letter, audit,
metrics, tracing) stays inside this package. Kept free of imports so that any of its
modules can be imported alone."""
