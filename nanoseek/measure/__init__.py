"""Measurement: FLOPs, time, energy, cost, provenance, and the comparison harness."""
