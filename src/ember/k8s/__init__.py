"""Ember k8s."""
