"""Start the configured listeners in our own event loop (not aiosmtpd's threaded Controller)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from relay.config.model import Config
from relay.listener.handler import SubmissionHandler
from relay.listener.policy import ConnectionGate, Policy
from relay.listener.session import Submission
from relay.routing.models import QueuedMessage
from relay.spool.store import Spool


async def start_listeners(config: Config, spool: Spool, tls_context: ssl.SSLContext | None,
                          on_accepted: Callable[[QueuedMessage], None]) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    policy = Policy(config)
    gate = ConnectionGate(config.limits.max_connections, config.limits.max_connections_per_ip)
    servers = []
    for listener in config.listeners:
        handler = SubmissionHandler(config, listener, policy, gate, spool, on_accepted)
        starttls = listener.tls == "starttls"
        implicit = listener.tls == "implicit"

        def factory(handler: SubmissionHandler = handler, starttls: bool = starttls,
                    implicit: bool = implicit) -> Submission:
            return Submission(
                handler,
                hostname=config.hostname,
                ident="relay",
                data_size_limit=config.limits.max_message_size,
                enable_SMTPUTF8=True,
                tls_context=tls_context if starttls else None,
                # On an implicit-TLS listener the whole session is encrypted already.
                auth_require_tls=not (implicit or config.tls.allow_plain_auth),
                timeout=config.limits.idle_timeout,
                loop=loop,
            )

        servers.append(await loop.create_server(
            factory, host=listener.address, port=listener.port,
            ssl=tls_context if implicit else None, reuse_address=True))
    return servers
