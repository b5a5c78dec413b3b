"""Configuration: the YAML of SPEC §3 as frozen typed values."""

from relay.config.loader import load_config, parse_config
from relay.config.model import (
    Account,
    Config,
    Delivery,
    Listener,
    Provider,
    Retry,
    Rule,
    Secret,
    Shaping,
    TrafficClass,
)
from relay.config.units import Rate, parse_duration, parse_rate, parse_size

__all__ = [
    "Account",
    "Config",
    "Delivery",
    "Listener",
    "Provider",
    "Rate",
    "Retry",
    "Rule",
    "Secret",
    "Shaping",
    "TrafficClass",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_rate",
    "parse_size",
]
