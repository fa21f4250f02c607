"""`primasim worker`: one process per device. It listens for a driver, loads its layer windows from
a memory-mapped checkpoint, and passes hidden states around the ring of devices over zmq.

Sockets (all on the address given with ``--listen``):

- control, ROUTER, ``tcp://HOST:PORT``: the driver's DEALER connects here (HELLO, SETUP, PING, ...).
  A dedicated thread serves it, so heartbeats are answered even while the compute thread is busy,
  and it ends the session when the driver's heartbeat stops for ``--heartbeat-timeout`` seconds;
- data, PULL, ``tcp://HOST:PORT+1`` (a random port with ``:0``): activations from the ring
  predecessor. The worker's own PUSH connects to its successor's data socket; a sender thread
  delays each message by the link's latency (+ seeded jitter) before sending it (user-space link
  latency, since ``netem`` is not available) and records a ``send`` span.

The compute thread executes `Plan.segments()`: an ACT message names the segment to run next; the
worker runs it if the segment is its own (and any of its own segments that directly follow),
relays it otherwise, and the head device turns a finished activation into a token (output layer +
sampling) and feeds the token back in. With S sequences in flight (RPP) every worker keeps one KV
cache per sequence. Prefetch (madvise WILLNEED of the next window) runs in a background thread.
"""

from .recorder import MEM_SAMPLE as MEM_SAMPLE, Recorder as Recorder
from .server import (
    Worker as Worker,
    is_loopback as is_loopback,
    listen_host as listen_host,
    serve as serve,
)
from .session import Session as Session
