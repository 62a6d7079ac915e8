#!/usr/bin/env python3
"""Plays a udpvid:// URI with playbin from Python (PyGObject), the way an
application embeds udpvid: pause while the source reports buffering below
100 %, play at 100 %, stop at the end or on an error.

    python3 examples/play.py udpvid://127.0.0.1/sample.mp4
    python3 examples/play.py --headless udpvid://127.0.0.1/sample.mp4

Needs python3-gi and gir1.2-gstreamer-1.0 (Debian), and the plugin
installed (`make install`) or on GST_PLUGIN_PATH. --headless plays into
fakesinks in real time, for machines without a display.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import Gst  # noqa: E402


def main(argv):
    headless = "--headless" in argv
    uris = [a for a in argv[1:] if not a.startswith("--")]
    if len(uris) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    Gst.init(None)
    if Gst.ElementFactory.find("udpvidsrc") is None:
        print("udpvidsrc not found: run `make install` or set GST_PLUGIN_PATH",
              file=sys.stderr)
        return 1
    playbin = Gst.ElementFactory.make("playbin", None)
    playbin.set_property("uri", uris[0])
    if headless:
        for prop in ("video-sink", "audio-sink"):
            sink = Gst.ElementFactory.make("fakesink", None)
            sink.set_property("sync", True)
            playbin.set_property(prop, sink)
    bus = playbin.get_bus()
    playbin.set_state(Gst.State.PAUSED)
    buffering = False
    pauses = 0
    status = 0
    while True:
        msg = bus.timed_pop(Gst.CLOCK_TIME_NONE)
        if msg.type == Gst.MessageType.BUFFERING:
            # Pause below 100 %, play at 100 %.
            was_buffering = buffering
            buffering = msg.parse_buffering() < 100
            pauses += buffering and not was_buffering
            playbin.set_state(Gst.State.PAUSED if buffering else Gst.State.PLAYING)
        elif msg.type == Gst.MessageType.ASYNC_DONE and not buffering:
            playbin.set_state(Gst.State.PLAYING)
        elif msg.type == Gst.MessageType.EOS:
            ok, position = playbin.query_position(Gst.Format.TIME)
            print("EOS at %.1f s of media, %d buffering pauses" %
                  (position / Gst.SECOND if ok else -1, pauses))
            break
        elif msg.type == Gst.MessageType.ERROR:
            err, debug = msg.parse_error()
            print("error: %s" % err.message, file=sys.stderr)
            status = 1
            break
    playbin.set_state(Gst.State.NULL)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
