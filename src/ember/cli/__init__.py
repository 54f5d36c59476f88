"""Ember cli."""
