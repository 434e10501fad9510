"""Named limits and timings shared by broker, client and tests.

Every number a peer can run into is here, so the protocol document, the core
and the shells agree. The broker's values can be overridden through
`zchat.core.Limits`.
"""

from __future__ import annotations

# Wire sizes.
MAX_BODY_BYTES = 8 * 1024  # one client message, checked before decoding
MAX_FRAME_BYTES = 64 * 1024  # ZMQ_MAXMSGSIZE on the broker's PULL socket
MAX_TEXT_CHARS = 2000
MAX_NAME_CHARS = 32
MAX_ROOM_CHARS = 32
MAX_REASON_CHARS = 200
MAX_ROOMS_PER_JOIN = 16

# Bookkeeping bounds, so one peer cannot grow the broker without bound.
MAX_PEERS = 20_000  # identities the broker tracks at once
MAX_TOPICS_PER_PEER = 64  # approved subscriptions remembered per identity
PEER_IDLE_SECONDS = 30.0  # forget a non-member identity after this much silence
MEMBERS_IN_WELCOME = 200  # names listed in a welcome; the count is always exact
MAX_NAMES_IN_REPLY = 500  # names listed in a who reply
MAX_ROOMS_IN_REPLY = 500  # rooms listed in a rooms reply
MAX_ROOMS_PER_MEMBER = 32

# History.
DEFAULT_HISTORY = 50  # events of a room shown on joining it
MAX_HISTORY_PER_REQUEST = 500
HISTORY_KEEP_PER_ROOM = 10_000  # retention: newest events kept per room...
HISTORY_KEEP_DAYS = 30.0  # ...and none older than this
MAILBOX_PER_USER = 100  # private messages kept for an offline user
KNOWN_NAMES = 100_000  # name -> last key, for messages to offline users
ROOMS_REMEMBERED = 100_000  # rooms whose last number is kept after retention dropped all their events

# Flood control: a token bucket per identity.
RATE_BURST = 20
RATE_PER_SECOND = 5.0

# Moderation.
MUTE_DEFAULT_SECONDS = 300  # /mute NAME without SECONDS
MUTE_MAX_SECONDS = 7 * 86400

# Timings (seconds).
BROKER_HEARTBEAT_INTERVAL = 1.0  # broker -> sys/ heartbeat
CLIENT_PING_INTERVAL = 1.0  # client -> broker application heartbeat
CLIENT_TIMEOUT = 3.0  # member silent this long is announced as left
BROKER_SILENCE_LOST = 3.5  # client: no broker heartbeat this long = connection lost
JOIN_RETRY_INTERVAL = 0.2  # client resends its join until welcomed
TICK_INTERVAL = 0.1  # broker housekeeping cadence
STATS_INTERVAL = 5.0  # default seconds between the broker's stats events on sys/

# Socket options (milliseconds / counts).
HANDSHAKE_IVL_MS = 5000
ZMQ_HEARTBEAT_IVL_MS = 1000
ZMQ_HEARTBEAT_TIMEOUT_MS = 3000
LISTEN_BACKLOG = 1024
PULL_RCVHWM = 1_000  # x MAX_FRAME_BYTES: at most 64 MiB queued per connection
XPUB_SNDHWM = 10_000
CLIENT_SNDHWM = 1_000
