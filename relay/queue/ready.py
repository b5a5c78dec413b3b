"""What one queue (a provider, or a default site) has ready to send, by class and site.

A lane's worker first opens a connection to a site, then takes work for the host it
reached: a connection carries mail for every domain of the queue that this host serves,
one transaction per domain (SPEC §2). Classes are taken highest priority first, so
transactional mail takes the next free transaction before bulk.

Recipients taken out meanwhile (held, deleted, flushed, bounced by an admin) are no
longer READY; a batch is filtered when taken, and skipped when nothing is left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from relay.queue.models import Batch, Where
from relay.routing.router import Queue, Site

ClassOpen = Callable[[str], bool]  # may a transaction of this class start now (its rate)?


class Consumer(Protocol):
    def wake(self) -> None:
        """New work arrived."""
        ...

    @property
    def suspended(self) -> str | None:
        """Why the consumer sends nothing now (a rule or an admin), or None."""
        ...


class ReadyQueue:
    def __init__(self, queue: Queue, priority: Callable[[str], int]) -> None:
        self.queue = queue
        self._priority = priority
        self._classes: dict[str, dict[str, deque[Batch]]] = {}
        self._order: list[str] = []
        self._sites: dict[str, Site] = {}
        self.pending = 0  # batches
        self.consumer: Consumer | None = None

    @property
    def key(self) -> str:
        return self.queue.key

    def push(self, batch: Batch, front: bool = False) -> None:
        by_site = self._classes.get(batch.class_name)
        if by_site is None:
            by_site = self._classes[batch.class_name] = {}
            self._order = sorted(self._classes, key=lambda name: -self._priority(name))
        site = batch.destination.site
        self._sites.setdefault(site.key, site)
        line = by_site.get(site.key)
        if line is None:
            line = by_site[site.key] = deque()
        if front:
            line.appendleft(batch)
        else:
            line.append(batch)
        self.pending += 1
        if self.consumer is not None:
            self.consumer.wake()

    def next_site(self, class_open: ClassOpen) -> Site | None:
        """The site of the oldest batch of the highest-priority class that may go now:
        where a new connection should go."""
        for name in self._order:
            by_site = self._classes[name]
            if not by_site or not class_open(name):
                continue
            oldest = min(by_site.values(), key=lambda line: line[0].message.envelope.received_at)
            return oldest[0].destination.site
        return None

    def take(self, site: Site, host: str, class_open: ClassOpen) -> Batch | None:
        """The next batch a connection to `host` (reached for `site`) can carry."""
        for name in self._order:
            by_site = self._classes[name]
            if not by_site or not class_open(name):
                continue
            for key in self._lines_for(by_site, site, host):
                batch = self._pop(name, by_site, key)
                if batch is not None:
                    return batch
        return None

    def _lines_for(self, by_site: dict[str, deque[Batch]], site: Site, host: str) -> Iterator[str]:
        if site.key in by_site:
            yield site.key
        for key in list(by_site):
            if key != site.key and self._sites[key].serves(host, site.source):
                yield key

    def _pop(self, name: str, by_site: dict[str, deque[Batch]], key: str) -> Batch | None:
        line = by_site[key]
        while line:
            batch = line.popleft()
            self.pending -= 1
            batch.recipients = [r for r in batch.recipients if r.where is Where.READY]
            if batch.recipients:
                if not line:
                    self._drop_line(by_site, key)
                return batch
        self._drop_line(by_site, key)
        return None

    def _drop_line(self, by_site: dict[str, deque[Batch]], key: str) -> None:
        del by_site[key]
        if not any(key in other for other in self._classes.values()):
            del self._sites[key]

    def waiting_elsewhere(self, site: Site, host: str, class_open: ClassOpen) -> bool:
        """Work this connection cannot carry is waiting for another site."""
        for name in self._order:
            if not class_open(name):
                continue
            for key in self._classes[name]:
                if key != site.key and not self._sites[key].serves(host, site.source):
                    return True
        return False

    def take_site(self, site: Site) -> list[Batch]:
        """Everything waiting for one site (it could not be reached)."""
        taken: list[Batch] = []
        for by_site in self._classes.values():
            line = by_site.pop(site.key, None)
            if line:
                self.pending -= len(line)
                taken.extend(line)
        self._sites.pop(site.key, None)
        return [b for b in taken if _keep_ready(b)]

    def batches(self) -> Iterator[Batch]:
        """Every batch waiting, in no particular order."""
        for by_site in self._classes.values():
            for line in by_site.values():
                yield from line

    def waiting_classes(self) -> list[str]:
        return [name for name in self._order if self._classes[name]]

    def sites(self) -> set[str]:
        return {key for by_site in self._classes.values() for key in by_site}


def _keep_ready(batch: Batch) -> bool:
    batch.recipients = [r for r in batch.recipients if r.where is Where.READY]
    return bool(batch.recipients)
