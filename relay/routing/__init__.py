"""Recipient → provider → queue; the deferred schedule; retry timing."""
