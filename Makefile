# udpvid: `make demo` and `make test` do everything on a fresh Debian 12.

SHELL := /bin/bash
CARGO ?= cargo
APT_PACKAGES := pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev \
	gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-x \
	gstreamer1.0-plugins-base-apps python3-gi gir1.2-gstreamer-1.0 tmux python3-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PLUGIN_DIR := $(CURDIR)/target/debug
DEMO_DIR := $(CURDIR)/streamer
DEMO_PORT ?= 50000

.PHONY: all deps venv build test lint demo demo-clip bench fuzz load clean install uninstall \
	install-service uninstall-service
FUZZ_SECONDS ?= 60
# The kernel-level tests drop packets with nftables and shape links with
# tc in network namespaces of their own.
TEST_PACKAGES := nftables iproute2
BENCH_PACKAGES := nginx nftables iproute2

# Installs those of the packages named in $(1) that are missing, so a
# second run costs nothing.
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

all: build

deps:
	$(call apt_install,$(APT_PACKAGES))
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust 1.85 or newer (https://rustup.rs)"; exit 1; }

build: deps
	$(CARGO) build --workspace --all-targets

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Test services only PyPI has, in a virtual environment under target/:
# moto, an S3-compatible server the object-storage tests start themselves.
VENV := $(CURDIR)/target/venv
MOTO := $(VENV)/bin/moto_server

$(MOTO): | deps
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'moto[server]'

venv: $(MOTO)

test: build lint venv
	$(call apt_install,$(TEST_PACKAGES))
	$(CARGO) test --workspace

# Install: the plugin where GStreamer looks without any environment
# variable, the server on PATH. As root: the system plugin folder (from
# pkg-config) and /usr/local/bin; otherwise ~/.local/share/gstreamer-1.0/
# plugins and ~/.local/bin. PLUGINDIR, BINDIR, DESTDIR and PROFILE
# (release; debug for quick tests) override.
ifeq ($(shell id -u),0)
PLUGINDIR ?= $(shell pkg-config --variable=pluginsdir gstreamer-1.0 2>/dev/null || echo /usr/local/lib/gstreamer-1.0)
BINDIR ?= /usr/local/bin
else
PLUGINDIR ?= $(HOME)/.local/share/gstreamer-1.0/plugins
BINDIR ?= $(HOME)/.local/bin
endif
PROFILE ?= release
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
INSTALLED := $(DESTDIR)$(PLUGINDIR)/libgstudpvid.so $(DESTDIR)$(BINDIR)/server
SERVICE_FILE := /etc/systemd/system/udpvid.service

install: deps
	$(CARGO) build $(CARGO_PROFILE_FLAG) -p gst-plugin-udpvid --lib
	$(CARGO) build $(CARGO_PROFILE_FLAG) -p udpvid-server --bin server
	install -D -m 644 target/$(PROFILE)/libgstudpvid.so $(DESTDIR)$(PLUGINDIR)/libgstudpvid.so
	install -D -m 755 target/$(PROFILE)/server $(DESTDIR)$(BINDIR)/server
	@echo "installed: $(INSTALLED)"
	@echo "try: gst-inspect-1.0 udpvidsrc"

uninstall:
	rm -f $(INSTALLED)
	@echo "removed: $(INSTALLED)"

# The server as a systemd service (root): serves /srv/udpvid read-only as a
# throw-away user, logs to the journal, restarts on failure. Edit
# $(SERVICE_FILE) (or `systemctl edit udpvid`) for another folder or port.
install-service: install
	install -D -m 644 server/udpvid.service $(SERVICE_FILE)
	sed -i 's|@BINDIR@|$(BINDIR)|' $(SERVICE_FILE)
	install -d -m 755 /srv/udpvid
	systemctl daemon-reload
	systemctl enable --now udpvid.service
	@echo "udpvid.service is running: put videos in /srv/udpvid; journalctl -u udpvid shows its log"

uninstall-service:
	-systemctl disable --now udpvid.service
	rm -f $(SERVICE_FILE)
	-systemctl daemon-reload

# A 20 s 720p H.264/AAC clip (moov at the end, as a camera would write it).
demo-clip: deps
	@mkdir -p $(DEMO_DIR)
	@if [ ! -s $(DEMO_DIR)/sample.mp4 ]; then \
		echo "Making $(DEMO_DIR)/sample.mp4"; \
		gst-launch-1.0 -q videotestsrc num-buffers=600 pattern=ball ! \
			video/x-raw,width=1280,height=720,framerate=30/1 ! timeoverlay ! \
			x264enc speed-preset=veryfast bitrate=3000 key-int-max=60 ! h264parse ! mux. \
			audiotestsrc num-buffers=862 wave=ticks ! audioconvert ! avenc_aac ! aacparse ! mux. \
			mp4mux name=mux ! filesink location=$(DEMO_DIR)/sample.mp4.tmp && \
		mv $(DEMO_DIR)/sample.mp4.tmp $(DEMO_DIR)/sample.mp4; \
	fi

# Serves streamer/ and plays sample.mp4 through udpvidsrc: in a window when
# there is a display, else decoded into a fakesink in real time.
demo: build demo-clip
	@set -e; \
	./target/debug/server --dir $(DEMO_DIR) --bind 127.0.0.1 --port $(DEMO_PORT) > target/demo-server.out 2> target/demo-server.log & \
	server=$$!; trap "kill $$server 2>/dev/null; wait $$server 2>/dev/null" EXIT; \
	for i in $$(seq 50); do grep -q listening target/demo-server.out 2>/dev/null && break; sleep 0.1; done; \
	cat target/demo-server.out; \
	echo "--- catalog:"; ./target/debug/examples/catalog 127.0.0.1 $(DEMO_PORT); \
	if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then vsink=autovideosink; asink=autoaudiosink; \
	else echo "--- no display: decoding into fakesink in real time"; vsink="fakesink sync=true"; asink="fakesink sync=true"; fi; \
	echo "--- playing udpvid://127.0.0.1:$(DEMO_PORT)/sample.mp4"; \
	GST_PLUGIN_PATH=$(PLUGIN_DIR) gst-launch-1.0 udpvidsrc host=127.0.0.1 port=$(DEMO_PORT) file=sample.mp4 ! \
		decodebin name=d d. ! queue ! videoconvert ! $$vsink d. ! queue ! audioconvert ! $$asink; \
	echo "--- byte-exact copy check"; \
	GST_PLUGIN_PATH=$(PLUGIN_DIR) gst-launch-1.0 -q udpvidsrc port=$(DEMO_PORT) file=sample.mp4 ! filesink location=target/demo-copy.mp4; \
	if cmp -s target/demo-copy.mp4 $(DEMO_DIR)/sample.mp4; then echo "copy is byte-identical"; else echo "copy differs"; exit 1; fi

# udpvid against HTTP (nginx + souphttpsrc) and SRT, same clip, same
# impairments; prints a table and writes target/bench/results.md.
# Not part of `make test`. Needs root for nftables and network namespaces.
bench: deps venv
	$(call apt_install,$(BENCH_PACKAGES))
	$(CARGO) build --release --workspace --lib --bins --examples
	$(CARGO) bench --bench bench

# Coverage-guided fuzzing of the decoder and both state machines, each for
# FUZZ_SECONDS. cargo-fuzz comes from crates.io; its sanitizer flags need a
# nightly compiler, which RUSTC_BOOTSTRAP=1 unlocks on this stable one.
# Crashes land in fuzz/artifacts/; copy them to fuzz/regressions/, which
# `make test` replays.
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in decode server client media_index; do \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; \
	done

# Hundreds of concurrent clients, some misbehaving, and 64 real element
# pipelines (gst-launch ! filesink) against the release server on
# loopback; prints server CPU, memory, throughput and each pipeline's time.
load: deps
	$(CARGO) build --release --workspace --lib --bins --examples
	./target/release/examples/load

clean:
	$(CARGO) clean
	rm -rf $(DEMO_DIR)
