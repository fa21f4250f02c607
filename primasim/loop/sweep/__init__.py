"""Parameter sweeps over systems, models and clusters (`primasim sweep SPEC`)."""
