"""Drift detection from the histograms devices send: the pure statistics are in :mod:`fleet.drift.stats`."""
