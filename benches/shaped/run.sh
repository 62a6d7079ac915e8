#!/bin/bash
# Plays the bench clip through a kernel-shaped link, udpvid and HTTP one
# after the other, with an application that pauses on buffering.
#
#   sudo benches/shaped/run.sh RATE [CLIP]      e.g. 2.05mbit (0.5x the clip)
#
# A namespace holds the udpvid server and nginx behind a veth whose egress is
# `tc tbf` (4 KB burst, 100 ms of queue); the players run outside it. Needs
# root, `make bench` run once (release build and clips), nginx and python3-gi.
set -euo pipefail
RATE=${1:?rate, e.g. 2.05mbit}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CLIPS=$ROOT/target/bench/clips
CLIP=${2:-bench.mp4}
NS=udpvid-shaped
WORK=$ROOT/target/shaped
mkdir -p "$WORK/logs"
cleanup() {
    [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null
    [ -n "${NGINX:-}" ] && kill "$NGINX" 2>/dev/null
    ip netns del $NS 2>/dev/null || true
    ip link del uvs0 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add $NS
ip link add uvs0 type veth peer name uvs1
ip link set uvs1 netns $NS
ip addr add 10.79.1.1/24 dev uvs0
ip link set uvs0 up
ip netns exec $NS ip addr add 10.79.1.2/24 dev uvs1
ip netns exec $NS ip link set uvs1 up
ip netns exec $NS ip link set lo up
ip netns exec $NS tc qdisc add dev uvs1 root tbf rate "$RATE" burst 32kbit latency 100ms
ip netns exec $NS "$ROOT/target/release/server" --dir "$CLIPS" --bind 10.79.1.2 --port 52000 \
    > "$WORK/server.log" 2>&1 &
SERVER=$!
cat > "$WORK/nginx.conf" <<EOC
daemon off; master_process off; worker_processes 1; pid $WORK/nginx.pid; error_log stderr crit;
events { worker_connections 64; }
http { access_log off; sendfile on; tcp_nopush on; default_type application/octet-stream;
client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
server { listen 10.79.1.2:8080; root $CLIPS; } }
EOC
ip netns exec $NS nginx -c "$WORK/nginx.conf" -p "$WORK" &
NGINX=$!
sleep 0.5
status=0
for uri in "udpvid://10.79.1.2:52000/$CLIP" "http://10.79.1.2:8080/$CLIP"; do
    GST_PLUGIN_PATH=$ROOT/target/release /usr/bin/python3 "$ROOT/benches/shaped/buffering_player.py" "$uri" 200 || status=1
done
ip netns exec $NS tc -s qdisc show dev uvs1 | sed -n 2p
grep -a "session closed" "$WORK/server.log" | sed 's/\x1b\[[0-9;]*m//g; s/.*reason/reason/' || true
exit $status
