"""YAML → `Config`, validated once, every problem named by its key path.

Problems are collected rather than raised one by one, so an admin fixes a file in one
pass. Anything that reaches the wire (hostnames, addresses) is checked for CR/LF here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import yaml

from relay.config import model as m
from relay.config import values as v
from relay.config.units import Rate, parse_duration, parse_rate, parse_size
from relay.errors import ConfigError

T = TypeVar("T")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MISSING = object()

DEFAULT_CLASSES = {
    "transactional": {"priority": 10},
    "bulk": {"priority": 1, "detect": ["list-id", "list-unsubscribe", "precedence-bulk"]},
}
DETECTORS = ("list-id", "list-unsubscribe", "precedence-bulk")


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, sentence: str) -> None:
        self.items.append(f"{path}: {sentence}" if path else sentence)


class _Node:
    """A mapping being read: remembers its path and which keys were used."""

    def __init__(self, data: object, path: str, problems: _Problems) -> None:
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            problems.add(path, f"expected a mapping, got {type(data).__name__}")
            data = {}
        self.data: Mapping[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, parse: Callable[[Any], T], default: Any) -> T:
        """Parse `name` with `parse`; on error record the problem and return `default`."""
        self.used.add(name)
        raw = self.data.get(name, _MISSING)
        if raw is _MISSING:
            if default is _MISSING:
                self.problems.add(self.key(name), "is required")
            return default  # type: ignore[no-any-return]
        if raw is None and default is None:
            return None  # type: ignore[return-value]
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            self.problems.add(self.key(name), str(exc))
            return default if default is not _MISSING else None  # type: ignore[return-value]

    def child(self, name: str) -> _Node:
        self.used.add(name)
        return _Node(self.data.get(name), self.key(name), self.problems)

    def items(self, name: str) -> list[tuple[str, Any]]:
        self.used.add(name)
        raw = self.data.get(name)
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problems.add(self.key(name), f"expected a list, got {type(raw).__name__}")
            return []
        return [(f"{self.key(name)}[{i}]", item) for i, item in enumerate(raw)]

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                self.problems.add(self.key(str(name)), "unknown key")


def _expand_env(value: Any, path: str, problems: _Problems) -> Any:
    """Replace ${VAR} in every string; a missing variable is a problem at its key path."""
    if isinstance(value, dict):
        return {
            k: _expand_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                problems.add(path, f"environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _ENV.sub(substitute, value)
    return value


def _rules(node: _Node, name: str) -> tuple[m.Rule, ...]:
    rules = []
    for path, raw in node.items(name):
        rule_node = _Node(raw, path, node.problems)
        pattern = rule_node.get("match", v.regex, _MISSING)
        action = rule_node.get(
            "action", v.choice("retry", "bounce", "suspend", "throttle"), _MISSING
        )
        duration = rule_node.get("for", parse_duration, None)
        rate = rule_node.get("rate", parse_rate, None)
        max_connections = rule_node.get("max_connections", v.integer(1), None)
        rule_node.finish()
        if action in ("suspend", "throttle") and duration is None:
            node.problems.add(f"{path}.for", f'is required for action "{action}" (like "30m")')
        if action == "throttle" and rate is None and max_connections is None:
            node.problems.add(path, 'action "throttle" needs "rate" or "max_connections"')
        if pattern is not None and action is not None:
            rules.append(m.Rule(pattern, action, duration, rate, max_connections))
    return tuple(rules)


def _shaping(node: _Node, base: m.Shaping | None, delivery_tls: str) -> m.Shaping:
    """Read shaping keys; a provider inherits each key it leaves out from `defaults`."""

    def inherit(name: str, fallback: Any) -> Any:
        return getattr(base, name) if base is not None else fallback

    return m.Shaping(
        max_connections=node.get("max_connections", v.integer(1), inherit("max_connections", 10)),
        max_messages_per_connection=node.get(
            "max_messages_per_connection", v.integer(1), inherit("max_messages_per_connection", 100)
        ),
        max_recipients_per_message=node.get(
            "max_recipients_per_message",
            v.integer(1, 1000),
            inherit("max_recipients_per_message", 100),
        ),
        rate=node.get("rate", v.optional(parse_rate), inherit("rate", None)),
        connection_rate=node.get(
            "connection_rate", v.optional(parse_rate), inherit("connection_rate", None)
        ),
        recipient_rate=node.get(
            "recipient_rate", v.optional(parse_rate), inherit("recipient_rate", None)
        ),
        route=node.get("route", v.optional(v.host_port(25)), inherit("route", None)),
        tls=node.get(
            "tls",
            v.choice("disabled", "opportunistic", "required", "verify", "dane"),
            inherit("tls", delivery_tls),
        ),
        rules=_rules(node, "rules"),
        adaptive=node.get("adaptive", v.boolean, inherit("adaptive", True)),
    )


def parse_config(raw: object, source: str = "") -> m.Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    problems = _Problems()
    raw = _expand_env(raw, "", problems)
    root = _Node(raw, "", problems)

    hostname = root.get("hostname", v.hostname, None) or socket.getfqdn()

    egress = _egress(root.child("egress"), problems)

    def egress_name(value: Any) -> str:
        text = v.string(value)
        if text not in egress:
            known = ", ".join(egress) or "none: add an egress section"
            raise ValueError(f"unknown egress source {text!r}; sources are {known}")
        return text

    classes: dict[str, m.TrafficClass] = {}
    classes_node = root.child("classes")
    merged = {**DEFAULT_CLASSES, **{str(k): v for k, v in classes_node.data.items()}}
    classes_node.used.update(str(k) for k in classes_node.data)
    for name, body in merged.items():
        cnode = _Node(body, classes_node.key(name), problems)
        detect = cnode.get("detect", v.string_list, ())
        for item in detect:
            if item not in DETECTORS:
                problems.add(
                    cnode.key("detect"),
                    f"unknown detector {item!r}; expected {', '.join(DETECTORS)}",
                )
        classes[name] = m.TrafficClass(
            name,
            cnode.get("priority", v.integer(0, 1000), 1),
            cnode.get("rate", parse_rate, None),
            detect,
            cnode.get("egress", egress_name, None),
            cnode.get("max_queued", v.integer(1), None),
        )
        cnode.finish()

    def class_name(value: Any) -> str:
        text = v.string(value)
        if text not in classes:
            raise ValueError(f"unknown class {text!r}; classes are {', '.join(classes)}")
        return text

    listeners = []
    listener_items = (
        root.items("listeners")
        if root.has("listeners")
        else [("listeners[0]", {"name": "submission"})]
    )
    for path, body in listener_items:
        lnode = _Node(body, path, problems)
        listeners.append(
            m.Listener(
                name=lnode.get("name", v.string, path),
                address=lnode.get("address", v.ip_address, "0.0.0.0"),
                port=lnode.get("port", v.integer(0, 65535), 587),
                tls=lnode.get("tls", v.choice("none", "starttls", "implicit"), "starttls"),
                auth=lnode.get("auth", v.choice("required", "none"), "required"),
                class_name=lnode.get("class", class_name, "transactional"),
                trusted_networks=lnode.get(
                    "trusted_networks", lambda raw: tuple(map(v.network, v.string_list(raw))), ()
                ),
            )
        )
        lnode.finish()
    if not listeners:
        problems.add("listeners", "at least one listener is required")

    tnode = root.child("tls")
    tls = m.TlsConfig(
        cert=tnode.get("cert", v.string, "/etc/relay/tls/fullchain.pem"),
        key=tnode.get("key", v.string, "/etc/relay/tls/privkey.pem"),
        self_signed=tnode.get("self_signed", v.boolean, False),
        allow_plain_auth=tnode.get("allow_plain_auth", v.boolean, False),
    )
    tnode.finish()

    lim = root.child("limits")
    limits = m.Limits(
        max_message_size=lim.get("max_message_size", parse_size, 25 * 1024 * 1024),
        max_recipients=lim.get("max_recipients", v.integer(1), 1000),
        max_connections=lim.get("max_connections", v.integer(1), 1000),
        max_connections_per_ip=lim.get("max_connections_per_ip", v.integer(1), 50),
        idle_timeout=lim.get("idle_timeout", parse_duration, 300.0),
    )
    lim.finish()

    snode = root.child("spool")
    spool_path = snode.get("path", v.string, "/var/spool/relay")
    snode.finish()

    anode = root.child("admin")
    admin = m.Admin(
        address=anode.get("address", v.ip_address, "127.0.0.1"),
        port=anode.get("port", v.integer(0, 65535), 9025),
        token=anode.get("token", lambda raw: m.Secret(v.string(raw)) if raw else None, None),
        metrics_public=anode.get("metrics_public", v.boolean, False),
    )
    anode.finish()

    dnode = root.child("dns")
    dns = m.Dns(
        nameservers=dnode.get(
            "nameservers", lambda raw: tuple(v.host_port(53)(x) for x in v.string_list(raw)), ()
        ),
        timeout=dnode.get("timeout", parse_duration, 5.0),
        dnssec=dnode.get("dnssec", v.boolean, False),
    )
    dnode.finish()

    guard = _guard(root, m.GuardSettings())
    accounts: list[m.Account] = []
    for path, body in root.items("accounts"):
        acnode = _Node(body, path, problems)
        name = acnode.get("name", v.string, _MISSING)
        if name and any(a.name == name for a in accounts):
            problems.add(acnode.key("name"), f"account {name!r} is defined twice")
        accounts.append(
            m.Account(
                name=name,
                password=acnode.get("password", v.password, _MISSING),
                senders=acnode.get("senders", v.string_list, _MISSING),
                class_name=acnode.get("class", class_name, None),
                rate=acnode.get("rate", v.optional(parse_rate), None),
                dkim=acnode.get("dkim", v.boolean, True),
                egress=acnode.get("egress", egress_name, None),
                guard=_guard(acnode, guard),
            )
        )
        acnode.finish()

    dlv = root.child("delivery")
    delivery = m.Delivery(
        port=dlv.get("port", v.integer(1, 65535), 25),
        source_address=dlv.get("source_address", v.optional(v.ip_address), None),
        tls=dlv.get(
            "tls",
            v.choice("disabled", "opportunistic", "required", "verify", "dane"),
            "opportunistic",
        ),
        connect_timeout=dlv.get("connect_timeout", parse_duration, 30.0),
        greeting_timeout=dlv.get("greeting_timeout", parse_duration, 300.0),
        command_timeout=dlv.get("command_timeout", parse_duration, 300.0),
        data_init_timeout=dlv.get("data_init_timeout", parse_duration, 120.0),
        data_xfer_timeout=dlv.get("data_xfer_timeout", parse_duration, 180.0),
        data_done_timeout=dlv.get("data_done_timeout", parse_duration, 600.0),
        idle_connection_timeout=dlv.get("idle_connection_timeout", parse_duration, 30.0),
        mta_sts=dlv.get("mta_sts", v.boolean, True),
        dane=dlv.get("dane", v.boolean, True),
        ca_file=dlv.get("ca_file", v.optional(v.string), None),
        tls_broken_ttl=dlv.get("tls_broken_ttl", parse_duration, 3 * 86400.0),
    )
    dlv.finish()

    rnode = root.child("retry")
    retry = m.Retry(
        initial=rnode.get("initial", parse_duration, 300.0),
        max=rnode.get("max", parse_duration, 3600.0),
        lifetime=rnode.get("lifetime", parse_duration, 5 * 86400.0),
        warn_after=rnode.get("warn_after", v.optional(parse_duration), None),
    )
    rnode.finish()
    if retry.max < retry.initial:
        problems.add("retry.max", f"must be at least retry.initial ({retry.initial:g}s)")

    defnode = root.child("defaults")
    defaults = _shaping(defnode, None, delivery.tls)
    defnode.finish()

    providers = []
    pnode = root.child("providers")
    pnode.used.update(str(k) for k in pnode.data)
    for name, body in pnode.data.items():
        if name == "default":
            problems.add(
                pnode.key(name),
                '"default" is reserved for destinations without a '
                "provider; tune them under defaults",
            )
        prov = _Node(body, pnode.key(str(name)), problems)
        domains = prov.get("domains", v.string_list, ())
        mx = prov.get("mx", v.string_list, ())
        shaping = _shaping(prov, defaults, delivery.tls)
        provider_egress = prov.get("egress", egress_name, None)
        shared_limits = prov.get("shared_limits", v.boolean, False)
        prov.finish()
        if not domains and not mx and shaping.route is None:
            problems.add(prov.path, 'needs "domains" or "mx" to know which mail is its own')
        providers.append(
            m.Provider(
                str(name),
                tuple(d.lower() for d in domains),
                tuple(x.lower() for x in mx),
                shaping,
                provider_egress,
                shared_limits,
            )
        )

    rules = _rules(root, "rules")

    cluster = None
    if root.has("cluster"):
        cnode = root.child("cluster")
        redis_url = cnode.get("redis", v.string, _MISSING)
        node = cnode.get("node", v.string, None) or socket.gethostname()
        lease = cnode.get("lease", parse_duration, 30.0)
        shared_spool = cnode.get("shared_spool", v.string, None)
        takeover_after = cnode.get("takeover_after", parse_duration, 120.0)
        cnode.finish()
        if redis_url and not str(redis_url).startswith(("redis://", "rediss://", "unix://")):
            problems.add(cnode.key("redis"), 'expected a URL like "redis://10.0.0.5:6379/0"')
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", node):
            problems.add(
                cnode.key("node"), "expected a name of letters, digits, '.', '_' or '-' (≤ 63)"
            )
        if lease < 3:
            # renewed every lease/3: under a second, one Redis hiccup loses every slot
            problems.add(cnode.key("lease"), "must be at least 3s (it is renewed every third)")
        if takeover_after < 5:
            # heartbeats come every second and count as missed after 3.5 s
            problems.add(cnode.key("takeover_after"), "must be at least 5s")
        if shared_spool is not None and not os.path.isabs(shared_spool):
            problems.add(cnode.key("shared_spool"), "expected an absolute path")
        if redis_url:
            cluster = m.Cluster(m.Secret(redis_url), node, lease, shared_spool, takeover_after)
            if shared_spool:
                # Each node's spool is its own directory there, so a peer can adopt it.
                spool_path = m.node_spool(shared_spool, node)

    dkim = _dkim(root.child("dkim"), problems)

    hnode = root.child("history")
    history = m.HistoryConfig(retain=hnode.get("retain", parse_duration, 7 * 86400.0))
    hnode.finish()
    if history.retain <= 0:
        problems.add("history.retain", "must be more than 0s (how long finished mail is kept)")

    egress_named = bool(egress)
    if egress_named:
        default_egress = root.get("default_egress", egress_name, None)
        if default_egress is None:
            if len(egress) == 1:
                default_egress = next(iter(egress))
            elif not root.has("default_egress"):
                problems.add(
                    "default_egress", f"required with several sources ({', '.join(egress)})"
                )
                default_egress = next(iter(egress))
    else:
        root.get("default_egress", egress_name, None)  # named without sources: an error
        default_egress = "default"
        bind = delivery.source_address
        v6 = bind is not None and ":" in bind
        egress = {
            "default": m.Egress("default", None if v6 else bind, bind if v6 else None, hostname)
        }

    # `tls: dane` defers every domain without validated TLSA; without DNSSEC nothing is
    # ever validated, so the whole provider would wait forever.
    if not dns.dnssec or not delivery.dane:
        dane_users = [("delivery.tls", delivery.tls)] + [
            (f"providers.{p.name}.tls", p.shaping.tls)
            for p in providers
            if delivery.tls != "dane"  # else they inherit it: one problem is enough
        ]
        for key, value in dane_users:
            if value == "dane":
                problems.add(
                    key,
                    "dane needs validated DNS answers: set dns.dnssec: true (and keep "
                    "delivery.dane: true) with a local validating resolver",
                )

    root.finish()
    if problems.items:
        raise ConfigError(problems.items)
    return m.Config(
        hostname=hostname,
        listeners=tuple(listeners),
        tls=tls,
        limits=limits,
        spool_path=spool_path,
        admin=admin,
        dns=dns,
        accounts=tuple(accounts),
        classes=classes,
        delivery=delivery,
        retry=retry,
        defaults=defaults,
        providers=tuple(providers),
        rules=rules,
        cluster=cluster,
        dkim=dkim,
        history=history,
        guard=guard,
        egress=egress,
        default_egress=default_egress or "default",
        egress_named=egress_named,
        source=source,
    )


def load_config(path: str) -> m.Config:
    """Read and validate the YAML file at `path`."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except ValueError as exc:
        # PyYAML builds an int of more than 4,300 digits with int(), which refuses it
        # (CVE-2020-10735): a ValueError, not a YAMLError, and no line number to give.
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from exc
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"]) from exc
    if raw is None:
        raw = {}
    return parse_config(raw, source=path)


__all__ = ["Rate", "load_config", "parse_config"]


def _dkim(node: _Node, problems: _Problems) -> m.Dkim:
    """Key entries; whether each key file can be read and used is checked by relay.dkim
    (check-config and start), which names the entry's key path."""
    keys: list[m.DkimKey] = []
    for path, body in node.items("keys"):
        knode = _Node(body, path, problems)
        domain = knode.get("domain", v.hostname, _MISSING)
        selector = knode.get("selector", v.hostname, _MISSING)
        keys.append(
            m.DkimKey(
                domain=domain.lower().rstrip(".") if domain else domain,
                selector=selector,
                key=knode.get("key", v.string, _MISSING),
            )
        )
        knode.finish()
    headers = node.get("headers", v.choice("default"), "default")
    node.finish()
    return m.Dkim(tuple(keys), headers)


def _guard(parent: _Node, base: m.GuardSettings) -> m.GuardSettings:
    """`guard` under `parent` (the top level or an account), each key defaulting to
    `base`'s; a block turns the guard on where it is (unless `enabled: false`), and
    `guard: false` (or true) is short for `enabled`."""
    if not parent.has("guard"):
        return base
    raw = parent.data["guard"]
    if isinstance(raw, bool):
        parent.used.add("guard")
        return replace(base, enabled=raw)
    node = parent.child("guard")
    settings = m.GuardSettings(
        enabled=node.get("enabled", v.boolean, True),
        volume_factor=node.get("volume_factor", v.number(1), base.volume_factor),
        min_volume=node.get("min_volume", v.integer(1), base.min_volume),
        max_bounce_ratio=node.get("max_bounce_ratio", v.number(0.01, 1), base.max_bounce_ratio),
        min_outcomes=node.get("min_outcomes", v.integer(1), base.min_outcomes),
        action=node.get("action", v.choice("hold", "refuse"), base.action),
    )
    node.finish()
    return settings


def _egress(node: _Node, problems: _Problems) -> dict[str, m.Egress]:
    """Named sending sources: an IPv4 and/or an IPv6 address, and an EHLO name. Whether
    each address is local is checked at start and by check-config (relay.config.checks)."""
    sources: dict[str, m.Egress] = {}
    node.used.update(str(k) for k in node.data)
    for name, body in node.data.items():
        snode = _Node(body, node.key(str(name)), problems)
        raw = snode.get("source_address", v.string_list, ())
        by_version: dict[int, str] = {}
        for address in raw:
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                problems.add(
                    snode.key("source_address"), f"expected an IP address, got {address!r}"
                )
                continue
            if parsed.version in by_version:
                problems.add(
                    snode.key("source_address"), f"at most one IPv{parsed.version} address"
                )
            by_version[parsed.version] = str(parsed)
        if not raw:
            problems.add(
                snode.key("source_address"), "is required (an IPv4 and/or an IPv6 address)"
            )
        ehlo = snode.get("ehlo", v.hostname, _MISSING)
        snode.finish()
        sources[str(name)] = m.Egress(str(name), by_version.get(4), by_version.get(6), ehlo or "")
    return sources
