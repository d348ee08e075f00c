"""Pure lifecycle logic: the state machine, checkpoint policy timing, reload diffs. No I/O."""
