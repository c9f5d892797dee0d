"""Hierarchical delegation: a coordinator plans, specialists do the steps, a reviewer
checks at checkpoints, the coordinator synthesises. Plans are signed, budgets bound a
workflow, a step can wait for human approval."""
