"""A small authoritative DNS server on a loopback UDP port, built on dnspython's wire format.

Real DNS over the wire for the relay under test: it answers what the test put in its
zone, NXDOMAIN for names it does not know, SERVFAIL for names marked so. For names marked
`secure` it plays a validating resolver: its answers (and denials) carry the AD bit when
the query asked for it with AD or DO (RFC 6840 §5.7), as DANE needs (RFC 7672).
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self._names: set[str] = set()  # names with any record: NODATA, not NXDOMAIN
        self._servfail: set[str] = set()
        self._secure: set[str] = set()  # names whose answers are "validated" (AD)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for a burst of queries (a fan-out to many domains) while one thread answers.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dns")
        self.queries: list[tuple[str, str]] = []

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    def add(self, name: str, rdtype: str, *values: str, ttl: int = 60) -> None:
        with self._lock:
            self._records[(self._key(name), rdtype.upper())] = (ttl, list(values))
            self._names.add(self._key(name))

    def mx(self, domain: str, *hosts: tuple[int, str]) -> None:
        self.add(domain, "MX", *(f"{pref} {host.rstrip('.')}." for pref, host in hosts))

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(self._key(name))

    def secure(self, *names: str) -> None:
        """Answers for these names say they were validated (the AD bit)."""
        with self._lock:
            self._secure.update(self._key(name) for name in names)

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = self._answer(dns.message.from_wire(data))
            except Exception:  # a malformed query gets no answer, as from a real server
                continue
            self._sock.sendto(reply.to_wire(), client)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            if name in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            found = self._records.get((name, rdtype))
            known = name in self._names
            asked = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
            if name in self._secure and asked:
                response.flags |= dns.flags.AD
        if found:
            ttl, values = found
            response.answer.append(
                dns.rrset.from_text_list(
                    question.name, ttl, dns.rdataclass.IN, question.rdtype, values
                )
            )
        elif not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response
