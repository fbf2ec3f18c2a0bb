# jetyolo: the only place install steps live. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := .stamps/install
export YOLO_OFFLINE := 1
export JETYOLO_HOME := $(CURDIR)/.jetyolo
export YOLO_CONFIG_DIR := $(JETYOLO_HOME)/ultralytics
export PYTHONUNBUFFERED := 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := .work/demo

.PHONY: install test lint demo bench bench-multicam rootfs-install service-demo update-demo clean

install: $(STAMP)

# Debian packages (mosquitto broker for MQTT tests and the demo, systemd-analyze for unit checks,
# chromium + chromium-driver for the preview page's browser test and the demo's screenshot),
# then the venv with every extra. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@if ! command -v mosquitto >/dev/null || ! command -v mosquitto_sub >/dev/null \
	   || ! command -v systemd-analyze >/dev/null || ! command -v chromium >/dev/null \
	   || ! command -v chromedriver >/dev/null; then \
	  echo "installing Debian packages: mosquitto mosquitto-clients systemd chromium chromium-driver"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients systemd \
	    chromium chromium-driver; \
	fi
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[host,device,tracking,dev]'
	@mkdir -p $(dir $@) && touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check host device tests
	$(BIN)/mypy

JY := $(BIN)/jetyolo
DEMO_DATA := $(DEMO)/data/data.yaml
DEMO_BUNDLE := $(DEMO)/bundle
DEMO_VIDEO := $(DEMO)/video.mp4
STEP := printf '\n\033[1m== %s\033[0m\n'

# The whole story on this machine: synthetic data -> train -> export -> calibrate -> reference ->
# CPU backend over a video -> detections at a real local MQTT broker -> verify -> benchmark.
demo: $(STAMP)
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@$(STEP) "1/10 synthetic dataset and a 1920x1080 video with ground truth"
	$(JY) data synth $(DEMO)/data --classes 4 --train 160 --val 60 --imgsz 320 --seed 42 \
	  --video $(DEMO_VIDEO) --frames 150
	@$(STEP) "2/10 dataset check"
	$(JY) data check $(DEMO_DATA)
	@$(STEP) "3/10 fine-tune the committed synthetic model (transfer learning from a .pt)"
	$(JY) train --data $(DEMO_DATA) --model tests/fixtures/synth_yolo11n.pt --epochs 3 --imgsz 320 \
	  --batch 16 --freeze 10 --optimizer AdamW --lr0 0.0001 --warmup-epochs 0 \
	  --name demo --project $(DEMO)/runs
	@$(STEP) "4/10 export: ONNX, graph-surgeon passes, parity with PyTorch, reference, bundle"
	$(JY) export $(DEMO)/runs/demo/weights/best.pt --out $(DEMO_BUNDLE) --name synth-demo --imgsz 320 --uint8-input --nms \
	  --data $(DEMO_DATA)
	$(JY) bundle verify $(DEMO_BUNDLE)
	@$(STEP) "5/10 INT8 calibration on the CPU: TensorRT caches + Q/DQ model, accuracy gate"
	$(JY) calibrate $(DEMO_BUNDLE) --images $(DEMO)/data/train/images --num 64 \
	  --trt-version 8.5.2 8.6.2 10.3.0 --data $(DEMO_DATA) --max-drop 1.5
	@$(STEP) "6/10 accuracy: FP32 vs INT8 Q/DQ on the val split"
	$(JY) eval $(DEMO_BUNDLE) --data $(DEMO_DATA) --variant fp32 --plots $(DEMO)/curves-fp32
	$(JY) eval $(DEMO_BUNDLE) --data $(DEMO_DATA) --variant int8-qdq --plots $(DEMO)/curves-int8
	@$(STEP) "7/10 device loop on the CPU backend, two cameras batched on one engine (a batch-2 export): detections to a local MQTT broker"
	$(JY) export $(DEMO)/runs/demo/weights/best.pt --out $(DEMO)/bundle-b2 --name synth-demo-b2 --imgsz 320 \
	  --uint8-input --batch 2
	port=$$($(BIN)/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	sub=""; mosquitto -p $$port > $(DEMO)/mosquitto.log 2>&1 & broker=$$!; \
	trap 'kill $$broker $$sub 2>/dev/null || true' EXIT; \
	timeout 10 bash -c "until (exec 3<>/dev/tcp/127.0.0.1/$$port) 2>/dev/null; do sleep 0.1; done"; \
	mosquitto_sub -h 127.0.0.1 -p $$port -q 1 -t 'jetyolo/#' -v > $(DEMO)/subscriber.log & sub=$$!; sleep 0.5; \
	cp $(DEMO_VIDEO) $(DEMO)/yard.mp4; \
	$(JY) run $(DEMO)/bundle-b2 --source $(DEMO_VIDEO) --source $(DEMO)/yard.mp4 --backend onnxruntime --device-id demo \
	  --config docs/tracking-demo.yaml \
	  --sink mqtt://127.0.0.1:$$port --sink jsonl:$(DEMO)/detections.jsonl --spool-dir $(DEMO)/spool \
	  --stats-interval 1; \
	sleep 1; \
	seqs=$$(grep '/detections ' $(DEMO)/subscriber.log | grep -o '"seq": *[0-9]*' | grep -o '[0-9]*$$' | sort -n); \
	echo "subscriber got $$(grep -c '/detections ' $(DEMO)/subscriber.log) detection messages" \
	  "($$(echo "$$seqs" | sort -u | wc -l) distinct seq $$(echo "$$seqs" | head -1)..$$(echo "$$seqs" | tail -1))," \
	  "$$(grep -c '/stats ' $(DEMO)/subscriber.log) stats; availability:" \
	  "$$(grep '/available ' $(DEMO)/subscriber.log | cut -d' ' -f2 | xargs)"; \
	echo "the first detection message:"; \
	grep -m1 '/detections ' $(DEMO)/subscriber.log | cut -d' ' -f2- | $(BIN)/python -c \
	  'import json, sys; m = json.load(sys.stdin); d = m.pop("detections"); print(json.dumps(m)); [print(" ", x) for x in d]'
	@$(STEP) "7b/10 operations endpoint: jetyolo run --http; /healthz, /metrics, a preview frame, the page in headless chromium"
	$(BIN)/python -m host.http_demo $(DEMO_BUNDLE) $(DEMO_VIDEO) $(DEMO)/http
	@$(STEP) "7c/10 tracking: events and zone counts at the broker, accuracy vs the video's object ids"
	@echo "subscriber got $$(grep -c '/events ' $(DEMO)/subscriber.log) events" \
	  "($$(grep -o '"event":"[a-z]*"' $(DEMO)/subscriber.log | sort | uniq -c | xargs))," \
	  "$$(grep -c '/zones/' $(DEMO)/subscriber.log) zone counts"
	$(JY) eval track --truth $(DEMO)/video.json --results $(DEMO)/detections.jsonl \
	  --config docs/tracking-demo.yaml --no-gate
	@$(STEP) "8/10 verify host vs device with polygraphy (FP32 tensors + detections), then the acceptance run (every variant verified and timed, one report)"
	$(JY) verify $(DEMO_BUNDLE) --backend onnxruntime --variant fp32
	$(JY) selftest $(DEMO_BUNDLE) --backend onnxruntime --runs 10 --out $(DEMO)/selftest
	@$(STEP) "9/10 benchmark summary: raw backend vs jetyolo pipeline vs ultralytics"
	$(JY) bench $(DEMO_BUNDLE) --source $(DEMO_VIDEO) --frames 60 --runs 1 --no-profile --out $(DEMO)/bench
	@$(STEP) "10/10 stage the hardened systemd service into a rootfs"
	$(MAKE) --no-print-directory service-demo BUNDLE=$(DEMO_BUNDLE)
	@$(STEP) "model update of the running detector: copy, verify, switch between two frames, roll back"
	systemd/update-demo.sh $(JY) $(DEMO_BUNDLE) $(DEMO)/update
	@echo; echo "demo finished: everything is in $(DEMO)/"

# The recorded benchmark (docs/BENCHMARKS.md, docs/bench.png): 640 and 320 px on a 1080p video,
# the uint8-input bundles the CPU backend runs by default, every contender at its default threads.
BENCH := .work/bench
bench: $(STAMP)
	$(JY) data synth $(BENCH)/data --train 4 --val 2 --video $(BENCH)/v1080.mp4 --frames 150 --force
	$(JY) export tests/fixtures/synth_yolo11n.pt --out $(BENCH)/synth640 --imgsz 640 --uint8-input --force
	$(JY) export tests/fixtures/synth_yolo11n.pt --out $(BENCH)/synth320 --imgsz 320 --uint8-input --force
	$(JY) bench $(BENCH)/synth640 $(BENCH)/synth320 --source $(BENCH)/v1080.mp4 \
	  --runs 5 --out $(BENCH)/results --plot docs/bench.png --append-md docs/BENCHMARKS.md

# Several cameras (issue 12, docs/BENCHMARKS.md): 1/2/4 sources in one process vs one process
# each, file and live at 30 FPS; ONNX Runtime per image at batch 1/2/4. About 10 min on 2 cores.
BENCH_MC := .work/bench-multicam
bench-multicam: $(STAMP)
	for b in 1 2 4; do $(JY) export tests/fixtures/synth_yolo11n.pt --out $(BENCH_MC)/b$$b \
	  --imgsz 320 --uint8-input --batch $$b --force || exit 1; done
	$(JY) bench $(BENCH_MC)/b1 $(BENCH_MC)/b2 $(BENCH_MC)/b4 --ort-batch --runs 9 --frames 12 \
	  --out $(BENCH_MC)/ort
	$(JY) bench $(BENCH_MC)/b1 --multi-bundle $(BENCH_MC)/b4 --sources 1,2,4 --live 30 \
	  --frames 60 --runs 2 --out $(BENCH_MC)/results

# Stage jetyolo into a Jetson rootfs (Linux_for_Tegra/rootfs before flash.sh, or / on a Jetson).
# An L4T rootfs belongs to root: sudo make rootfs-install ROOTFS=... BUNDLE=...
# Optional: CONFIG=file.yaml  WHEELHOUSE=dir-of-aarch64-wheels (offline)  SERVICE_ARGS=--dry-run
rootfs-install: $(STAMP)
	@[ -n "$(ROOTFS)" ] || { echo "usage: make rootfs-install ROOTFS=Linux_for_Tegra/rootfs BUNDLE=DIR [CONFIG=FILE] [WHEELHOUSE=DIR] [SERVICE_ARGS=--dry-run]" >&2; exit 2; }
	$(BIN)/jetyolo service install --rootfs "$(ROOTFS)" \
	  $(if $(BUNDLE),--bundle "$(BUNDLE)") $(if $(CONFIG),--config "$(CONFIG)") \
	  $(if $(WHEELHOUSE),--wheelhouse "$(WHEELHOUSE)") $(SERVICE_ARGS)

# Stage into a throw-away rootfs, verify the units, print the systemd-analyze exposure scores.
SERVICE_BUNDLE := $(DEMO)/service-bundle
$(SERVICE_BUNDLE)/manifest.json: | $(STAMP)
	$(BIN)/jetyolo export tests/fixtures/synth_yolo11n.pt --out $(SERVICE_BUNDLE) --imgsz 320 --force
service-demo: $(STAMP) $(if $(BUNDLE),,$(SERVICE_BUNDLE)/manifest.json)
	systemd/service-demo.sh $(BIN)/jetyolo "$(or $(BUNDLE),$(SERVICE_BUNDLE))" $(WHEELHOUSE)

# The model-update switch measured (docs/BENCHMARKS.md): SWITCHES alternating update/rollback.
SWITCHES ?= 6
update-demo: $(STAMP) $(SERVICE_BUNDLE)/manifest.json
	systemd/update-demo.sh $(JY) $(SERVICE_BUNDLE) .work/update-demo $(SWITCHES)

clean:
	rm -rf .work runs .pytest_cache .mypy_cache .ruff_cache
