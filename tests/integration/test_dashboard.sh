#!/usr/bin/env bash
# The operator's dashboard in a real browser: launches a two-node CPU cluster (own name, run_dir and a
# free gateway port), sends a few completions, then drives Debian's headless Chromium through
# playwright-core (tests/integration/dashboard_browser/check_dashboard.mjs) against GET /dashboard:
# every panel must show live data, a SIGKILLed node process must show up as a restart (epoch, restart
# count, pid, timeline entry), and the expert-load heatmap must render when the data carries it.
# Screenshots: $PETREL_BUILD_DIR/dashboard.png (+ dashboard-expert-load.png, dashboard-failure.png).
# Needs: /usr/bin/chromium and the npm package (tools/setup.sh installs both).
set -euo pipefail

src="${PETREL_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
bin="${PETREL_BINARY:-$src/build/petrel}"
out="${PETREL_BUILD_DIR:-$src/build}"
browser_dir="$src/tests/integration/dashboard_browser"

die() { echo "test_dashboard: FAIL: $*" >&2; exit 1; }

[ -x "$bin" ] || die "no petrel binary at $bin (set PETREL_BINARY)"
[ -x /usr/bin/chromium ] || die "no /usr/bin/chromium: run tools/setup.sh (installs Debian's chromium and chromium-driver)"
command -v node >/dev/null || die "no node: run tools/setup.sh"
[ -f "$browser_dir/node_modules/playwright-core/package.json" ] ||
  die "playwright-core is not installed in $browser_dir: run tools/setup.sh (npm install there)"

tmp="$(mktemp -d /tmp/petrel-dash-test.XXXXXX)"
name="dash$$"
cfg="$tmp/cluster.yaml"
launch_pid=""

cleanup() {
  local rc=$?
  if [ -n "$launch_pid" ]; then
    "$bin" stop "$cfg" --timeout 20 >/dev/null 2>&1 || true
    # the head exits once its nodes are stopped; make sure nothing of ours is left behind
    for _ in $(seq 1 50); do kill -0 "$launch_pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$launch_pid" 2>/dev/null; then
      for pid in $(pgrep -P "$launch_pid" || true); do kill -9 "$pid" 2>/dev/null || true; done
      kill -9 "$launch_pid" 2>/dev/null || true
    fi
  fi
  if [ $rc -ne 0 ] && [ -d "$tmp/run" ]; then
    echo "--- launch log ---" >&2; tail -n 40 "$tmp/launch.log" >&2 2>/dev/null || true
    for f in "$tmp"/run/"$name"/*.log; do [ -f "$f" ] && { echo "--- $f ---" >&2; tail -n 20 "$f" >&2; }; done
  fi
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT INT TERM

# The default cluster.yaml with its own name, run_dir, an absolute model path and gateway port 0.
sed -e "s#^  name: petrel\$#  name: $name#" \
    -e "s#^  run_dir: .*#  run_dir: $tmp/run#" \
    -e "s#^  path: tests/data/fortune-moe#  path: $src/tests/data/fortune-moe#" \
    -e "/^gateway:/,/^[a-z]/ s#^  port: .*#  port: 0#" \
    "$src/cluster.yaml" > "$cfg"
grep -q "name: $name" "$cfg" && grep -q "run_dir: $tmp/run" "$cfg" || die "could not derive a test config from $src/cluster.yaml"

(cd "$src" && exec "$bin" launch "$cfg" --no-demo) > "$tmp/launch.log" 2>&1 &
launch_pid=$!

head_json="$tmp/run/$name/head.json"
port=""
for _ in $(seq 1 240); do
  kill -0 "$launch_pid" 2>/dev/null || die "petrel launch exited early: $(tail -n 5 "$tmp/launch.log")"
  if [ -f "$head_json" ]; then
    port="$(sed -n 's/.*"gateway_port": *\([0-9][0-9]*\).*/\1/p' "$head_json")"
    [ -n "$port" ] && [ "$port" != 0 ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  fi
  port=""
  sleep 0.5
done
[ -n "$port" ] || die "the gateway did not come up within 120 s (run file $head_json)"
url="http://127.0.0.1:$port"
echo "test_dashboard: cluster $name up, gateway $url"

for i in 1 2 3; do
  curl -sf --max-time 60 "$url/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"fortune-moe\",\"prompt\":\"Dashboard check $i:\",\"max_tokens\":16}" >/dev/null ||
    die "completion $i failed against $url"
done
echo "test_dashboard: 3 completions served"

mkdir -p "$out"
rm -f "$out/dashboard.png" "$out/dashboard-failure.png" "$out/dashboard-expert-load.png"
node "$browser_dir/check_dashboard.mjs" --url "$url" --config "$cfg" --petrel "$bin" \
  --screenshot "$out/dashboard.png" --kill-node p0 ||
  die "the browser checks failed (see the [dashboard] lines above; screenshot $out/dashboard-failure.png)"
[ -s "$out/dashboard.png" ] || die "no screenshot at $out/dashboard.png"
echo "test_dashboard: PASS (screenshot $out/dashboard.png)"
