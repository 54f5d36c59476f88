"""Ember guest."""
