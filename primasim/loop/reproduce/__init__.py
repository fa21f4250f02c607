"""Reproduce the papers' figures and tables from the simulator (`primasim reproduce NAME`)."""
