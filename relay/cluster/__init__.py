"""A cluster's shared state on Redis (SPEC §9): connection-slot leases, GCRA rates
(a lane's, its mailboxes', the accounts'), lane suspensions, throttles and adaptive
limits, account guard trips, AUTH failure counters, node heartbeats, and the takeover of
a dead node's spool.

Nothing here imports redis until a `cluster` block asks for it (link.py): a single
node needs neither the library nor a server. Each module owns one thing:

    link.py       the client, its health (up/down), and every command's timeout
    scripts.py    the Lua scripts, loaded once and run by EVALSHA
    nodes.py      heartbeats: who is alive, and how many were last seen
    leases.py     connection slots per provider and site, renewed while in use
    rates.py      GCRA rates as one budget for the cluster, per lane and per mailbox
    broadcast.py  events told to every node (a hash and a channel)
    lanes.py      suspensions, throttles and adaptive limits, through broadcast.py
    guards.py     the account guard's trips and releases, through broadcast.py
    authfail.py   AUTH failures counted cluster-wide, for the listener process
    accountrates.py  account rates as one budget, for the listener process
    lock.py       a lock with a fencing token (for spool takeover)
    takeover.py   a dead node's spool on shared storage adopted by one live node
    node.py       the parts wired for the main process; `relay cluster status`

When Redis is down or hangs, every part falls back to a local share of the limit: the
configured limit divided by the live nodes last seen (at least 1 each).
"""
