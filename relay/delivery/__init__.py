"""Delivery: lanes per provider, outbound SMTP sessions, reply classification, outcomes."""
