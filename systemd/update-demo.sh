#!/bin/sh
# `make update-demo`: update the model of a running detector in place (docs/service.md).
#   usage: systemd/update-demo.sh JETYOLO BUNDLE WORK [SWITCHES]
# Seeds a bundle store in WORK/device with BUNDLE, starts `jetyolo run` on the store's active
# link (CPU backend, a long synthetic video, detections to a JSON-lines file), then alternates
# `jetyolo update NEW` and `jetyolo update --rollback` SWITCHES times (default 2), where NEW is
# BUNDLE under another name (a stand-in for a retrained model: another model_id). At the end it
# checks the messages (every seq once, every frame index once, model_id changing only at the
# switches) and prints each switch's gap as the service measured it.
set -eu
JETYOLO=$1
BUNDLE=$2
WORK=$3
SWITCHES=${4:-2}
PYTHON=$(dirname "$JETYOLO")/python
rm -rf "$WORK" && mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)  # absolute: the config's paths are read relative to its own folder
DEVICE=$WORK/device

"$JETYOLO" data synth "$WORK/scene" --train 1 --val 1 --imgsz 64 --video "$WORK/long.mp4" \
  --frames 3000 --video-size 320x180 >/dev/null
cp -r "$BUNDLE" "$WORK/retrained"
"$PYTHON" - "$WORK/retrained/manifest.json" <<'EOF'
import json, sys
manifest = json.load(open(sys.argv[1]))
manifest["name"] += "-v2"
json.dump(manifest, open(sys.argv[1], "w"), indent=2)
EOF
cat > "$WORK/config.yaml" <<EOF
bundle: $DEVICE/active
source: $WORK/long.mp4
backend: onnxruntime
threads: 1
sinks: ['jsonl:$WORK/messages.jsonl']
spool_dir: $DEVICE/spool
stats_interval_s: 1
EOF

echo "== jetyolo update $BUNDLE (seeds the store; nothing runs yet)"
"$JETYOLO" update "$BUNDLE" --device-dir "$DEVICE" --config "$WORK/config.yaml" 2>/dev/null
echo "== jetyolo run --config $WORK/config.yaml (bundle: $DEVICE/active), in the background"
"$JETYOLO" run --config "$WORK/config.yaml" 2>"$WORK/run.log" &
RUN=$!
trap 'kill $RUN 2>/dev/null || true' EXIT
until [ -s "$DEVICE/service.json" ] && [ -s "$WORK/messages.jsonl" ]; do sleep 0.2; done

i=1
while [ "$i" -le "$SWITCHES" ]; do
  if [ $((i % 2)) -eq 1 ]; then
    echo "== jetyolo update $WORK/retrained (copy, build, verify, switch)"
    "$JETYOLO" update "$WORK/retrained" --device-dir "$DEVICE" --config "$WORK/config.yaml" \
      2>&1 | grep -E '^update: (the service|switching)|^RESULT'
  else
    echo "== jetyolo update --rollback"
    "$JETYOLO" update --rollback --device-dir "$DEVICE" --config "$WORK/config.yaml" \
      2>&1 | grep -E '^update: (the service|rolling)'
  fi
  i=$((i + 1))
done
echo "== jetyolo update --list"
"$JETYOLO" update --list --device-dir "$DEVICE" --config "$WORK/config.yaml"
kill "$RUN" && wait "$RUN" || true
trap - EXIT
"$PYTHON" - "$WORK/messages.jsonl" <<'EOF'
import json, sys
messages = [json.loads(line) for line in open(sys.argv[1])]
payloads = [m["payload"] for m in messages if isinstance(m["payload"], dict)]
frames = [p for p in payloads if p["type"] == "detections"]
seqs = sorted(p["seq"] for p in payloads)
indices = [f["frame_index"] for f in frames]
models = [f["model_id"] for f in frames]
runs = [m for i, m in enumerate(models) if i == 0 or models[i - 1] != m]
print(f"messages: {len(payloads)}, seq {seqs[0]}..{seqs[-1]}, none missing: "
      f"{seqs == list(range(seqs[0], seqs[0] + len(seqs)))}")
print(f"frames: {len(frames)}, indices 0..{indices[-1]}, none missing: "
      f"{indices == list(range(len(indices)))}")
print("model_id per frame, in order:", " -> ".join(runs))
switches = {}
for p in payloads:
    if p["type"] == "stats" and "model_update" in p:
        switches[p["model_update"]["at"]] = p["model_update"]
for s in switches.values():
    print(f"switch {s['from']} -> {s['to']}: gap {s['gap_ms']} ms between the last frame of the "
          f"old model and the first of the new (usual interval {s['usual_frame_interval_ms']} "
          f"ms), frame indices skipped: {s['frame_indices_skipped']}")
EOF
