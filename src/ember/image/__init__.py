"""Ember image."""
