"""Toy world: synthetic coloured shapes, a small SD-style model and a detector (imported lazily)."""
