"""Metrics and the status page."""
