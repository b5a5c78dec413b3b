"""Submission listener: aiosmtpd sessions, policy, DATA reading, spooling before 250."""
