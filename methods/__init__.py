"""Unlearning methods: one module each, behind methods.base.Method."""
