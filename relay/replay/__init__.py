"""`relay replay`: recorded replies judged again under a new config (SPEC §12).

Every delivery attempt in a JSON log (`relay serve --log-format json`) carries the reply a
server gave, the provider it was for and the verdict it got. Replay judges each reply again
with `relay.delivery.classify.classify`, the daemon's one place that decides, over the rules
a lane of NEW.yaml would hold (the provider's own, then the global ones), and says what
would change: verdicts (bounced → deferred), rules that would match, suspensions and
throttles that would start.

Offline by construction: NEW.yaml is parsed by the daemon's loader, but nothing it only
names is opened (DKIM keys, certificates, source addresses); the provider comes from the
log, so no domain is routed again and no DNS is asked; no daemon is contacted.

    logfile.py   a log line → a recorded attempt, another entry, or malformed
    judge.py     the rules of NEW.yaml per provider; the report: rows, changes, pauses
    output.py    the human table and the JSON document
    cli.py       `relay replay --config NEW.yaml LOGFILE...`
"""

from relay.replay.judge import Judge, Report, replay
from relay.replay.logfile import Other, Recorded, read_line

__all__ = ["Judge", "Other", "Recorded", "Report", "read_line", "replay"]
