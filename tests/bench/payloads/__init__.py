"""Programs the benchmarks run under the supervisors (each file also runs as a script)."""
