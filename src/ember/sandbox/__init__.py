"""Ember sandbox."""
