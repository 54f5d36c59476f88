"""Ember net."""
