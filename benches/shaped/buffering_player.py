#!/usr/bin/python3
"""A playbin application that pauses on buffering, as gst-play-1.0 and most
players do: it prints when playback first started, how often and how long it
paused after that, and when the end was reached (seconds from the start).

usage: buffering_player.py URI [LIMIT_SECONDS]
"""
import sys
import time

import gi

gi.require_version("Gst", "1.0")
from gi.repository import Gst  # noqa: E402

Gst.init(None)
uri = sys.argv[1]
limit = float(sys.argv[2]) if len(sys.argv) > 2 else 200.0
player = Gst.ElementFactory.make("playbin")
player.set_property("uri", uri)
for prop in ["video-sink", "audio-sink"]:
    sink = Gst.ElementFactory.make("fakesink")
    sink.set_property("sync", True)
    player.set_property(prop, sink)
bus = player.get_bus()
player.set_state(Gst.State.PAUSED)
t0 = time.monotonic()
buffering = False
first = None
pauses = 0
paused_s = 0.0
pause_at = None
result = None
while time.monotonic() - t0 < limit:
    m = bus.timed_pop(100 * Gst.MSECOND)
    if m is None:
        continue
    now = time.monotonic() - t0
    if m.type == Gst.MessageType.BUFFERING:
        was = buffering
        buffering = m.parse_buffering() < 100
        if buffering and not was and first is not None:
            pauses += 1
            pause_at = now
        if not buffering and was and pause_at is not None:
            paused_s += now - pause_at
            pause_at = None
        if not buffering and first is None:
            first = now
        player.set_state(Gst.State.PAUSED if buffering else Gst.State.PLAYING)
    elif m.type == Gst.MessageType.ASYNC_DONE and not buffering:
        if first is None:
            first = now
        player.set_state(Gst.State.PLAYING)
    elif m.type == Gst.MessageType.EOS:
        result = "first %.1f pauses %d paused %.1f end %.1f" % (first or -1, pauses, paused_s, now)
        break
    elif m.type == Gst.MessageType.ERROR:
        result = "error %s" % (m.parse_error(),)
        break
player.set_state(Gst.State.NULL)
print("%s: %s" % (uri, result or "no end within %.0f s (%d pauses)" % (limit, pauses)))
sys.exit(0 if result and not result.startswith("error") else 1)
