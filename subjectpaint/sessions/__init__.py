"""Placement sessions: thin configurations of the one sampler (subjectpaint.sampler)."""
