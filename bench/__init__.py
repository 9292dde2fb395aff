"""Measurements outside the test suite: `make chaos` (faults that must lose nothing) and, later, `make bench`."""
