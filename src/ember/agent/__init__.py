"""Ember agent."""
