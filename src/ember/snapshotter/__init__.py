"""Ember snapshotter."""
