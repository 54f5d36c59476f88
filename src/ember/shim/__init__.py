"""Ember shim."""
