#!/usr/bin/env bash
# Starts the whole service on the built-in tiny model, sends one chat with an image, and stops the service.
# Needs the package installed (pip install ".[cpu]") and Redis on 127.0.0.1:6379 or redis-server on PATH.
set -euo pipefail
port=${PIXTRAL_DEMO_PORT:-50051}
workdir=$(mktemp -d)
trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null; rm -rf "$workdir"' EXIT

pixtral-serve --model tiny --port "$port" > "$workdir/serve.out" 2> "$workdir/serve.log" &
serve_pid=$!
for _ in $(seq 1 600); do
  grep -q '^ready ' "$workdir/serve.out" && break
  kill -0 $serve_pid 2>/dev/null || { cat "$workdir/serve.log" >&2; exit 1; }
  sleep 0.5
done
grep '^ready ' "$workdir/serve.out" || { echo "pixtral-serve did not become ready" >&2; exit 1; }

python - "$workdir/picture.png" <<'PY'
import sys
from PIL import Image, ImageDraw
image = Image.new("RGB", (320, 200), "white")
ImageDraw.Draw(image).ellipse((100, 40, 220, 160), fill="orange", outline="black")
image.save(sys.argv[1])
PY

echo "--- streamed answer (the tiny model has random weights, so the text is noise):"
pixtral-chat --gateway "127.0.0.1:$port" --image "$workdir/picture.png" --max-tokens 24 --temperature 0 \
  "What is in this picture?"
echo "--- the same image again, by reference, as JSON lines:"
sha=$(python -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" \
  "$workdir/picture.png")
pixtral-chat --gateway "127.0.0.1:$port" --image-ref "$sha" --max-tokens 4 --temperature 0 --json "And now?"
