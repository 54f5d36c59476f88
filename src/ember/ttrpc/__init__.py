"""Ember ttrpc."""
