"""The runtime: what runs an agent. :mod:`.runner` composes :mod:`.lanes` (order, flow
control, offsets, commits) and :mod:`.process` (one record's fate: decode, handle, the
retry decision, outputs, retry record, dead letter, audit, metrics, tracing);
:mod:`.host` runs many agents in one process. Kept free of imports so that any of its
modules can be imported alone."""
