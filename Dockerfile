# Production image: non-root, spool on a volume, config and certificates mounted.
#   docker build -t relay .
#   docker run -v relay-spool:/var/spool/relay -v /etc/relay:/etc/relay:ro \
#              -p 587:587 -p 127.0.0.1:9025:9025 relay
FROM python:3.11-slim

RUN useradd --system --home-dir /var/spool/relay --shell /usr/sbin/nologin relay \
    && mkdir -p /var/spool/relay /etc/relay \
    && chown relay:relay /var/spool/relay

WORKDIR /opt/relay
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir '.[fast]' && rm -rf /root/.cache

COPY config/relay.yaml /etc/relay/relay.example.yaml
ENV RELAY_CONFIG=/etc/relay/relay.yaml \
    PYTHONUNBUFFERED=1

USER relay
VOLUME ["/var/spool/relay"]
EXPOSE 587 9025

# /readyz: the listeners serve and the spool is writable (admin listener, default port).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9025/readyz', timeout=8)" || exit 1

STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve"]
