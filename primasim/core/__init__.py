"""Specs and shared facts: model, device, cluster, plan, trace, units, errors, io, paths.

Every other package builds on this one; it imports nothing of primasim outside itself.
"""
