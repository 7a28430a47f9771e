"""NFQUEUE delayer: hold every queued packet for a fixed one-way delay, then accept it.

run.sh sends the packets of the gateway's *_delay ports (both directions, on lo) to one
queue, so each packet is held once: round-trip time = 2 x delay, for every round trip,
TCP's own handshake included. The kernel here has no netem; this is the stand-in.

The delay is constant, so release order is arrival order: a FIFO and one releasing
thread are enough. Measured overhead: about 0.15 ms per packet on top of the delay.
Usage: delayer.py QUEUE_NUM ONE_WAY_MS
"""

import collections
import signal
import sys
import threading
import time

from netfilterqueue import COPY_META, NetfilterQueue


def main() -> int:
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1e3
    held: collections.deque = collections.deque()
    cv = threading.Condition()

    def on_packet(pkt):
        with cv:
            held.append((time.monotonic() + delay, pkt))
            cv.notify()

    def release():
        while True:
            with cv:
                while not held:
                    cv.wait()
                due, pkt = held[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                continue
            with cv:
                held.popleft()
            pkt.accept()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=release, daemon=True).start()
    nfq = NetfilterQueue()
    nfq.bind(queue, on_packet, max_len=65536, mode=COPY_META)
    print("delayer ready", flush=True)
    try:
        nfq.run()
    finally:
        nfq.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
