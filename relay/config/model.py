"""The configuration as frozen, typed values. Built once by `loader`, never mutated."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Literal

from relay.config.units import Rate

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TlsMode = Literal["none", "starttls", "implicit"]
DeliveryTls = Literal["disabled", "opportunistic", "required", "verify", "dane"]
DKIM_ALGORITHMS = ("rsa", "ed25519")
RuleAction = Literal["retry", "bounce", "suspend", "throttle"]
GuardAction = Literal["hold", "refuse"]


class Secret(str):
    """A string that never shows itself in a repr or a log line."""

    def __repr__(self) -> str:
        return "Secret('********')"


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    tls: TlsMode
    auth: Literal["required", "none"]
    class_name: str
    trusted_networks: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class TlsConfig:
    cert: str
    key: str
    self_signed: bool
    allow_plain_auth: bool


@dataclass(frozen=True)
class Limits:
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    idle_timeout: float


@dataclass(frozen=True)
class Admin:
    address: str
    port: int
    token: Secret | None  # None: a token generated into the spool is used (SPEC §12)
    metrics_public: bool  # /metrics without a token even on a non-loopback address


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[tuple[str, int], ...]
    timeout: float
    dnssec: bool = False  # trust the AD bit of the configured (local, validating) resolver


@dataclass(frozen=True)
class GuardSettings:
    """The account guard's thresholds (SPEC §12): the top-level `guard`, or one
    account's, which overrides it key by key (relay/guard says how they are applied).
    Off without a `guard` block: a new relay must not hold a first big mailing."""

    enabled: bool = False
    volume_factor: float = 5.0  # the last hour over this many times the baseline trips
    min_volume: int = 200  # ... and over this many recipients: never below it
    max_bounce_ratio: float = 0.3  # remote 5xx over finished recipients in the last hour
    min_outcomes: int = 50  # the ratio is judged from this many finished recipients on
    action: GuardAction = "hold"  # hold: 250, then held; refuse: 450 4.7.1 at MAIL


@dataclass(frozen=True)
class Account:
    name: str
    password: Secret
    senders: tuple[str, ...]
    class_name: str | None
    rate: Rate | None
    dkim: bool = True  # false: this account's mail is left unsigned
    egress: str | None = None  # pins the account's mail to a source, over its class
    guard: GuardSettings = field(default_factory=GuardSettings)  # resolved: top level + own


@dataclass(frozen=True)
class DkimKey:
    """One signing key (SPEC §11); the From: header's domain picks it."""

    domain: str  # normalised (A-label, lower case)
    selector: str
    key: str  # path to the PEM private key (RSA or Ed25519)


@dataclass(frozen=True)
class Dkim:
    keys: tuple[DkimKey, ...] = ()
    headers: str = "default"  # RFC 6376 §5.4.1 set; From, Subject, To oversigned


@dataclass(frozen=True)
class TrafficClass:
    name: str
    priority: int
    rate: Rate | None
    detect: tuple[str, ...]
    egress: str | None = None  # the source its mail leaves from (SPEC §14)
    # Recipients of this class queued per provider (or site) beyond which new RCPTs get
    # 452 4.3.1 (SPEC §12, relay/queue/admission.py); None: no cap.
    max_queued: int | None = None


@dataclass(frozen=True)
class Egress:
    """A sending identity: the local address(es) connections bind to and the EHLO name.
    Receivers keep reputation per IP and name, so bulk can leave from its own."""

    name: str
    ipv4: str | None
    ipv6: str | None
    ehlo: str

    def address_for(self, family_v6: bool) -> str | None:
        return self.ipv6 if family_v6 else self.ipv4

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a)


@dataclass(frozen=True)
class Delivery:
    port: int
    source_address: str | None
    tls: DeliveryTls
    connect_timeout: float  # TCP connect only
    greeting_timeout: float  # the initial 220 (RFC 5321 §4.5.3.2.1)
    command_timeout: float  # EHLO, STARTTLS, MAIL, RCPT, RSET, QUIT
    data_init_timeout: float  # DATA → 354 (§4.5.3.2.5)
    data_xfer_timeout: float  # each block of the content (§4.5.3.2.6)
    data_done_timeout: float  # <CRLF>.<CRLF> → final reply (§4.5.3.2.7)
    idle_connection_timeout: float
    mta_sts: bool = True  # honour MTA-STS (RFC 8461)
    dane: bool = True  # honour DANE TLSA (RFC 7672) when DNS answers are validated
    ca_file: str | None = None  # extra CA bundle for verification
    tls_broken_ttl: float = 3 * 86400.0  # opportunistic: plaintext to an MX whose TLS broke


@dataclass(frozen=True)
class Retry:
    initial: float
    max: float
    lifetime: float
    warn_after: float | None


@dataclass(frozen=True)
class Rule:
    """A reply rule: `pattern` is searched in "CODE X.Y.Z text", case-insensitively."""

    pattern: re.Pattern[str]
    action: RuleAction
    duration: float | None = None
    rate: Rate | None = None
    max_connections: int | None = None


@dataclass(frozen=True)
class Shaping:
    """Delivery limits of one provider (or of `defaults`, per destination domain)."""

    max_connections: int
    max_messages_per_connection: int
    max_recipients_per_message: int
    rate: Rate | None
    connection_rate: Rate | None
    recipient_rate: Rate | None
    route: tuple[str, int] | None
    tls: DeliveryTls
    rules: tuple[Rule, ...]
    adaptive: bool = True  # a throttle-kind reply halves the limits (SPEC §12)


@dataclass(frozen=True)
class Provider:
    name: str
    domains: tuple[str, ...]
    mx: tuple[str, ...]
    shaping: Shaping
    egress: str | None = None  # e.g. keep Gmail on an IPv4-only source
    shared_limits: bool = False  # one set of limits for all sources, not one per source


def node_spool(shared_spool: str, node: str | None) -> str:
    """A node's spool under `cluster.shared_spool` (SPEC §9): `<dir>/<node>`, the node
    named by the machine's hostname unless `cluster.node` says otherwise."""
    return os.path.join(shared_spool, node or socket.gethostname())


@dataclass(frozen=True)
class Cluster:
    redis: Secret  # the URL may carry a password
    node: str  # unique per node; names its leases and heartbeat
    lease: float = 30.0  # a connection slot held by a dead node comes back after this
    shared_spool: str | None = None  # read by takeover, which is not built here
    takeover_after: float = 120.0


@dataclass(frozen=True)
class HistoryConfig:
    retain: float = 7 * 86400.0  # finished messages stay findable this long (SPEC §12)


@dataclass(frozen=True)
class Config:
    hostname: str
    listeners: tuple[Listener, ...]
    tls: TlsConfig
    limits: Limits
    spool_path: str
    admin: Admin
    dns: Dns
    accounts: tuple[Account, ...]
    classes: dict[str, TrafficClass]
    delivery: Delivery
    retry: Retry
    defaults: Shaping
    providers: tuple[Provider, ...]
    rules: tuple[Rule, ...]
    cluster: Cluster | None
    dkim: Dkim = field(default_factory=Dkim)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    guard: GuardSettings = field(default_factory=GuardSettings)
    # Sending sources by name; without an `egress` section, one named "default" made of
    # delivery.source_address and hostname.
    egress: dict[str, Egress] = field(default_factory=dict)
    default_egress: str = "default"
    egress_named: bool = False  # the YAML names sources: queues are kept per source
    source: str = field(default="", compare=False)

    def account(self, name: str) -> Account | None:
        for account in self.accounts:
            if account.name == name:
                return account
        return None
