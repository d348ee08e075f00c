"""The supervisor: runs programs in sandboxes, checkpoints, restores, recovers after a crash."""
