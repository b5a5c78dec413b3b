"""relay: an outbound SMTP relay that treats each provider the way it demands."""

__version__ = "0.1.0"
