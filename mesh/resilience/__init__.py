"""Resilience features an agent opts into: circuit breakers whose state a compacted
topic shares (:mod:`.breaker`, :mod:`.probe`) and fallback agents (:mod:`.fallback`).
Retries and dead letters are the runtime's (:mod:`mesh.runtime.retry`,
:mod:`mesh.runtime.dead_letter`)."""
