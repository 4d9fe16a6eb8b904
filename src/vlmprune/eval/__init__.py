"""Measurement: FLOPs accounting (and, with issue 4, latency, tasks and sweeps)."""
