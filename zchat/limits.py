"""Named limits and timings shared by broker, client and tests.

Every number a peer can run into is here, so the protocol document, the core
and the shells agree. The broker's values can be overridden through
`zchat.core.Limits`.
"""

from __future__ import annotations

# Wire sizes.
# One client message, checked before decoding: room for a `msg` whose two boxes each hold
# MAX_TEXT_CHARS of 4-byte UTF-8 (2 x MAX_BOX_CHARS = 21,440) plus its other fields.
MAX_BODY_BYTES = 24 * 1024
MAX_FRAME_BYTES = 64 * 1024  # ZMQ_MAXMSGSIZE on the broker's PULL socket
MAX_TEXT_CHARS = 2000
# Line breaks a message keeps (a paste of code, a stack trace): past this many lines, the rest
# of its breaks become spaces, so one message never fills a screen with lines.
MAX_TEXT_LINES = 50
MAX_NAME_CHARS = 32
MAX_ROOM_CHARS = 32
MAX_REASON_CHARS = 200
MAX_TOPIC_CHARS = 300  # a room's topic
MAX_ROOMS_PER_JOIN = 16
# One message on the input socket is one frame. A multipart one is refused (too_many_frames);
# past either bound it is dropped unread and its sender's connections are cut.
MAX_MESSAGE_PARTS = 16
MAX_MESSAGE_BYTES = 4 * MAX_FRAME_BYTES  # all parts of one message together: 256 KiB

# End-to-end private messages: a box is NaCl crypto_box output (a 24-byte nonce, then the
# ciphertext with its 16-byte MAC) in standard base64. The broker cannot count characters
# of a text it cannot read, so it bounds the box: 1 to MAX_TEXT_CHARS 4-byte UTF-8
# characters, i.e. 1 to 8,000 bytes of text.
BOX_NONCE_BYTES = 24
BOX_MAC_BYTES = 16
MAX_BOX_CHARS = 4 * -(-(BOX_NONCE_BYTES + BOX_MAC_BYTES + 4 * MAX_TEXT_CHARS) // 3)  # 10,720
MIN_BOX_CHARS = 4 * -(-(BOX_NONCE_BYTES + BOX_MAC_BYTES + 1) // 3)  # 56

# Bookkeeping bounds, so one peer cannot grow the broker without bound.
MAX_PEERS = 20_000  # identities the broker tracks at once
MAX_TOPICS_PER_PEER = 64  # approved subscriptions remembered per identity
PEER_IDLE_SECONDS = 30.0  # forget a non-member identity after this much silence
MEMBERS_IN_WELCOME = 200  # names listed in a welcome; the count is always exact
MAX_NAMES_IN_REPLY = 500  # names listed in a who reply
MAX_ROOMS_IN_REPLY = 500  # rooms listed in a rooms reply
MAX_ROOMS_PER_MEMBER = 32
POSTS_REMEMBERED = 16  # a key's latest posts whose resend is confirmed again, not published twice
ROOMS_IN_REFUSAL = 20  # rooms named in a no_such_room refusal

# Connections: what one key, one address and everyone together may hold open.
CONNECTIONS_PER_KEY = 4  # live connections of one key on each broker socket (input, publish)
FD_RESERVE = 128  # descriptors kept below RLIMIT_NOFILE for the broker's own files and handshakes
EVICTED_COOLDOWN = 10.0  # seconds a key evicted to make room is refused at the handshake
NEW_KEYS_PER_MINUTE = 30  # keys new to the broker admitted per source address (IPv6: per /64)
ADDRESSES_TRACKED = 10_000  # source addresses whose new-key budget is remembered
SHED_MIN_AGE = 0.2  # seconds: under descriptor pressure, connections silent this long are cut first
LOG_FOLD_SECONDS = 10.0  # a repeated refusal or accept failure is logged once per this, then summed

# History.
DEFAULT_HISTORY = 50  # events of a room shown on joining it
MAX_HISTORY_PER_REQUEST = 500
HISTORY_KEEP_PER_ROOM = 10_000  # retention: newest events kept per room...
HISTORY_KEEP_DAYS = 30.0  # ...and none older than this
MAX_HISTORY_PAGE_BYTES = 256 * 1024  # stored events in one history answer; fewer, with `more`
# The largest frame the broker sends a client: a full history page plus what wraps it (its
# topic u/<id>/ and a space, 68 bytes; the seal, 40; the answer's other fields, at most 219;
# a comma between events, 499): 826 bytes, so 1 KiB of headroom. Size a receive limit to it.
MAX_PUBLISHED_FRAME_BYTES = MAX_HISTORY_PAGE_BYTES + 1024
# History answers per key, in bytes: a token bucket (full at first sight). An empty one refuses
# history requests (rate_limited) and shortens the history a join or an enter brings.
HISTORY_BYTES_BURST = 4 * 1024 * 1024
HISTORY_BYTES_PER_SECOND = 512 * 1024
MAILBOX_PER_USER = 100  # private messages kept for an offline user (per key)...
MAILBOX_PER_SENDER = 10  # ...of which at most this many from one sender (`mailbox_full` past it)
KNOWN_NAMES = 100_000  # name -> last key, for messages to offline users
ROOM_TOPICS_KEPT = 100_000  # rooms whose topic is kept (the most recently set)
ROOMS_REMEMBERED = 100_000  # rooms whose last number is kept after retention dropped all their events

# Flood control: a token bucket per identity.
RATE_BURST = 20
RATE_PER_SECOND = 5.0
PINGS_PER_SECOND = 5  # a member's pings beyond this many in one second are ignored
MAX_FRAMES_PER_SECOND = 200  # any frames: a key sending more in one second is cut off

# A slow reader: bytes published on a key's private stream since its publish connections last
# had an empty kernel send queue (so nothing waited in the broker for them either). Past this
# budget the broker cuts those connections and tells the key why when it subscribes again.
MAX_BACKLOG_BYTES = 8 * 1024 * 1024

# Moderation.
MUTE_DEFAULT_SECONDS = 300  # /mute NAME without SECONDS
MUTE_MAX_SECONDS = 7 * 86400

# Timings (seconds).
BROKER_HEARTBEAT_INTERVAL = 1.0  # broker -> sys/ heartbeat...
# ...spaced out with many online, as each goes to every one of them: at most this many
# heartbeat deliveries a second, up to BROKER_HEARTBEAT_MAX apart (10,000 online: 2 s). The
# interval is announced in every heartbeat and welcome; a client counts silence in intervals.
HEARTBEAT_DELIVERIES_PER_SECOND = 5_000
BROKER_HEARTBEAT_MAX = 2.0
# Idle cost: at 10,000 members every ping is 10,000 frames a second to decrypt and decode.
# Pings every 2 s with a 4 s timeout keep the slack for a late ping (2 s) and announce a hung
# member 2 to 4.5 s after it stopped (the timeout, then the next expiry scan).
CLIENT_PING_INTERVAL = 2.0  # client -> broker application heartbeat, only after this long unheard
CLIENT_TIMEOUT = 4.0  # member silent this long is announced as left
BROKER_SILENCE_LOST = 3.5  # client: no broker heartbeat this long (x interval / 1 s) = connection lost
JOIN_RETRY_INTERVAL = 0.2  # client resends its join until welcomed: first after this...
JOIN_RETRY_MAX = 2.0  # ...then each wait twice the last, up to this (no resend storm under load)
TICK_INTERVAL = 0.1  # broker housekeeping cadence
STATS_INTERVAL = 5.0  # default seconds between the broker's stats events on sys/

# Socket options (milliseconds / counts).
HANDSHAKE_IVL_MS = 5000
# ZMTP heartbeats only find dead TCP connections (presence has its own pings and the socket
# monitor); each one is a CURVE frame both ways, on every connection, from both ends.
ZMQ_HEARTBEAT_IVL_MS = 20_000  # clients only: the broker sets none (see Broker._curve_server)
ZMQ_HEARTBEAT_TIMEOUT_MS = 60_000
# The broker's sockets: the kernel finds dead peers (no libzmq timer per connection).
TCP_KEEPALIVE_IDLE_S = 30  # probes after this long idle...
TCP_KEEPALIVE_INTVL_S = 10  # ...this far apart...
TCP_KEEPALIVE_CNT = 3  # ...this many unanswered: the connection is dropped
TCP_MAXRT_MS = 60_000  # data unacknowledged this long: the connection is dropped (TCP_USER_TIMEOUT)
LISTEN_BACKLOG = 1024
PULL_RCVHWM = 1_000  # x MAX_FRAME_BYTES: at most 64 MiB queued per connection
XPUB_SNDHWM = 10_000
CLIENT_SNDHWM = 1_000
