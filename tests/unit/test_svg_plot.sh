#!/usr/bin/env bash
# `petrel simulate --plot` and `petrel bench --plot` write well-formed SVG (parsed with Python's XML parser) with
# the panels, series and axis labels they promise. bench runs against a small OpenAI-compatible stand-in server
# (Python, chunked SSE with real gaps between tokens), since bench works against any such server.
set -euo pipefail
: "${PETREL_BINARY:?set PETREL_BINARY to the built petrel}"
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# -- simulate ---------------------------------------------------------------------------------------------------
"$PETREL_BINARY" simulate --plot "$work/sim.svg" > "$work/sim.txt"
python3 - "$work/sim.svg" <<'EOF'
import sys, xml.etree.ElementTree as ET
ns = {"s": "http://www.w3.org/2000/svg"}
root = ET.parse(sys.argv[1]).getroot()
panels = root.findall(".//s:g[@class='panel']", ns)
assert len(panels) == 2, f"expected 2 panels, got {len(panels)}"
texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
for label in ["tokens/s per node", "speedup (x)", "prefill 1K prompts", "prefill 2K prompts", "prefill 4K prompts", "decode"]:
    assert any(label == t for t in texts), f"missing text {label!r}"
for p in panels:
    series = p.findall("s:g[@class='series']", ns)
    assert [s.get("data-series") for s in series] == ["simulated (petrel simulate)", "published (SGLang, H100)"], series
    counts = [len(s.findall("s:rect", ns)) for s in series]
    assert counts[0] == counts[1] and counts[0] >= 4, counts
    for s in series:
        for r in s.findall("s:rect", ns):
            assert float(r.get("height")) > 0, "a bar of zero height"
print("simulate plot ok")
EOF
if "$PETREL_BINARY" simulate --plot /nonexistent-dir/s.svg > /dev/null 2> "$work/err.txt"; then
  echo "simulate --plot to an unwritable path succeeded"; exit 1
else
  rc=$?; [[ $rc == 2 ]] || { echo "expected exit 2, got $rc"; exit 1; }
  grep -q "/nonexistent-dir/s.svg" "$work/err.txt" || { echo "the error does not name the file"; cat "$work/err.txt"; exit 1; }
fi

# -- bench ------------------------------------------------------------------------------------------------------
cat > "$work/server.py" <<'EOF'
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send_json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.send_json({"object": "list", "data": [{"id": "stand-in", "object": "model", "max_model_len": 4096}]})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        def chunk(s):
            b = s.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
            self.wfile.flush()
        n = req["max_tokens"]
        time.sleep(0.02)
        for i in range(n):
            chunk("data: " + json.dumps({"choices": [{"index": 0, "text": "x", "finish_reason": None}]}) + "\n\n")
            time.sleep(0.003)
        chunk("data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                                     "usage": {"prompt_tokens": 8, "completion_tokens": n}}) + "\n\n")
        chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(srv.server_address[1], flush=True)
srv.serve_forever()
EOF
python3 "$work/server.py" > "$work/port.txt" &
server_pid=$!
for _ in $(seq 50); do [[ -s "$work/port.txt" ]] && break; sleep 0.1; done
port=$(head -1 "$work/port.txt")
"$PETREL_BINARY" bench --port "$port" --num-prompts 12 --input-len 8 --output-len 10 --max-concurrency 4 \
  --warmup 0 --plot "$work/bench.svg" > "$work/bench.txt"
python3 - "$work/bench.svg" <<'EOF'
import sys, xml.etree.ElementTree as ET
ns = {"s": "http://www.w3.org/2000/svg"}
root = ET.parse(sys.argv[1]).getroot()
paths = root.findall(".//s:path[@class='series']", ns)
assert [p.get("data-series") for p in paths] == ["TTFT", "ITL", "E2E"], [p.get("data-series") for p in paths]
for p in paths:
    d = p.get("d")
    assert d.startswith("M") and d.count("V") >= 10, f"{p.get('data-series')}: too few steps in {d[:80]}"
texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
assert "latency (ms, log scale)" in texts and "cumulative fraction" in texts, texts
assert any("12 requests" in t for t in texts), "the title counts the requests"
print("bench plot ok")
EOF

# -- throughput against concurrency, from the --json results of a small sweep ------------------------------------
for c in 1 2 4; do
  "$PETREL_BINARY" bench --port "$port" --num-prompts 6 --input-len 8 --output-len 6 --max-concurrency $c \
    --warmup 0 --json "$work/sweep_$c.json" > /dev/null
done
"$PETREL_BINARY" bench --plot-from "$work"/sweep_{4,1,2}.json --plot "$work/sweep.svg" 2> /dev/null
python3 - "$work/sweep.svg" <<'PY'
import sys, xml.etree.ElementTree as ET
ns = {"s": "http://www.w3.org/2000/svg"}
root = ET.parse(sys.argv[1]).getroot()
paths = root.findall(".//s:path[@class='series']", ns)
names = [p.get("data-series") for p in paths]
assert names == ["output tok/s", "input tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"], names
for p in paths:
    assert p.get("d").count("L") == 2, f"{p.get('data-series')}: expected 3 points, got {p.get('d')}"
    xs = [float(seg.split()[0]) for seg in p.get("d")[1:].split("L")]
    assert xs == sorted(xs), "points are not in order of concurrency"
texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
assert texts.count("max concurrency (requests in flight)") == 2 and "tokens/s" in texts, texts
print("sweep plot ok")
PY
if "$PETREL_BINARY" bench --plot-from "$work/sim.svg" --plot "$work/x.svg" 2> /dev/null; then
  echo "--plot-from accepted an SVG as bench results"; exit 1
fi
echo "test_svg_plot.sh: ok"
