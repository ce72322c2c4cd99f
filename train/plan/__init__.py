"""The memory planner (`train.dry_run=memory`): a fake-tensor training step, live bytes by category, parallel-engine terms, report."""
