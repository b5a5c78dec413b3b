# Production image: non-root, spool on a volume, config and certificates mounted.
#   docker build -t relay .
#   docker run -d --name relay --network host --read-only --cap-drop ALL \
#              -v relay-spool:/var/spool/relay -v /etc/relay:/etc/relay:ro relay
# /etc/relay/relay.yaml is the configuration (relay.example.yaml in the image shows every
# key); docs/operations.md ("Installing") has the details: ports, grace, health check.
FROM python:3.11-slim

# A fixed numeric id: bind-mounted spools can be chowned to it ahead of time, and
# orchestrators can check that the user is not root (Kubernetes' runAsNonRoot needs a
# number to do so).
RUN groupadd --system --gid 999 relay \
    && useradd --system --uid 999 --gid relay --home-dir /var/spool/relay \
       --shell /usr/sbin/nologin relay \
    && mkdir -p /var/spool/relay /etc/relay \
    && chown relay:relay /var/spool/relay

# Built from a copy that is removed afterwards: only the installed package stays.
COPY pyproject.toml README.md /tmp/relay-src/
COPY relay /tmp/relay-src/relay
RUN pip install --no-cache-dir '/tmp/relay-src[fast]' && rm -rf /tmp/relay-src /root/.cache

COPY config/relay.yaml /etc/relay/relay.example.yaml
ENV RELAY_CONFIG=/etc/relay/relay.yaml \
    PYTHONUNBUFFERED=1
WORKDIR /var/spool/relay

USER 999:999
VOLUME ["/var/spool/relay"]
EXPOSE 587 9025

# /readyz: the listeners serve and the spool is writable. The admin listener's address
# and port come from the config: set RELAY_HEALTHCHECK_URL when they are not the default.
# No proxy: the environment's http_proxy must not catch a request to ourselves.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ.get('RELAY_HEALTHCHECK_URL', 'http://127.0.0.1:9025/readyz'), timeout=8)"]

# docker stop waits 10 s before SIGKILL: relay drains for 8 s, then leaves what is still
# in flight in the spool for the next start. Raise both together (--grace here,
# docker run --stop-timeout or compose's stop_grace_period) for slow destinations.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve", "--grace", "8"]
