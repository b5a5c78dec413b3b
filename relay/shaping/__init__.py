"""Shaping: rates (GCRA), a lane's live limits (throttles, slow start), suspensions."""
