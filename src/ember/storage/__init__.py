"""Ember storage."""
