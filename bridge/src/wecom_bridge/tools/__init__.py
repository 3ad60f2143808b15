"""Operator tools built on the service: doctor, probe, simulate, send."""
