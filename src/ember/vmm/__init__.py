"""Ember vmm."""
