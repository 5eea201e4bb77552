"""A producer process for the put socket's end-to-end tests.

``python putsocket_producer.py SPOOL DESTINATION NAME COUNT [PAUSE]`` puts
COUNT messages ``NAME:seq`` with ``dropr.Spool.put``, rotating over three
channels, and prints one JSON line per put: its id, or the error it raised.
The last line gives how many puts this process wrote itself.
"""

from __future__ import annotations

import json
import sys
import time

import dropr

CHANNELS = ("orders", "audit", "mail")


def main() -> None:
    spool, destination, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    out = sys.stdout
    with dropr.Spool(spool, max_bytes=None, max_messages=None) as s:
        for seq in range(count):
            channel = CHANNELS[seq % len(CHANNELS)]
            try:
                mid = s.put(f"{name}:{seq}".encode(), destination, channel)
                out.write(json.dumps({"seq": seq, "id": mid}) + "\n")
            except Exception as e:
                out.write(json.dumps({"seq": seq, "error": repr(e)}) + "\n")
            out.flush()
            if pause:
                time.sleep(pause)
        out.write(json.dumps({"written_here": s.written_here}) + "\n")


if __name__ == "__main__":
    main()
