"""Metrics: one module each, behind metrics.base.Metric."""
