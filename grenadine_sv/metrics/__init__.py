"""Prometheus metrics: the collector of image figures and the /metrics endpoint."""
