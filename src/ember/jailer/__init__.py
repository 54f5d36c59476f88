"""Ember jailer."""
