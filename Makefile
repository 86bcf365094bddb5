# Set-up and the two entry points of the README: `make demo` and `make test`.
# The install pins the CPU build of torch (constraints/cpu.txt) so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/scan-deploy
DEMO ?= runs/demo
DEMO_TRAIN ?= 5000
DEMO_EPOCHS ?= 4
DEMO_PORT ?= 8765

.PHONY: install test lint demo clean

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e '.[reference,export,faiss,plots,serve,ray,dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest

demo: install
	rm -rf $(DEMO)
	$(CLI) data synth --out $(DEMO)/data --train $(DEMO_TRAIN) --dev 1000 --test 1000 --img-dim 256 \
		--noise 0.5 --seed 0 --pictures
	$(CLI) train --data $(DEMO)/data --out $(DEMO)/run --epochs $(DEMO_EPOCHS) --embed-size 256 \
		--word-dim 128 --lr 2e-3 --lr-update 3 --val-images 500
	$(CLI) evaluate $(DEMO)/run/model_best --data $(DEMO)/data --split test \
		--plot $(DEMO)/recall.png
	$(CLI) export $(DEMO)/run/model_best --out $(DEMO)/bundle
	$(CLI) compare $(DEMO)/bundle $(DEMO)/run/model_best --data $(DEMO)/data --split test
	$(CLI) calibrate $(DEMO)/bundle --data $(DEMO)/data --precision fp16
	$(CLI) calibrate $(DEMO)/bundle --data $(DEMO)/data --precision int8 \
		--plot $(DEMO)/gate-int8.png
	$(CLI) check $(DEMO)/bundle --target tensorrt
	$(CLI) build-engine $(DEMO)/bundle --backend onnxruntime --precision int8
	$(CLI) index $(DEMO)/bundle --features $(DEMO)/data/test_ims.npy \
		--captions $(DEMO)/data/test_caps.txt --out $(DEMO)/gallery \
		--first-stage maxsim --first-stage global
	@echo "text queries: test captions 0 and 6, ground truth images 0 and 1"
	$(CLI) query $(DEMO)/gallery "$$(sed -n 1p $(DEMO)/data/test_caps.txt)" \
		"$$(sed -n 7p $(DEMO)/data/test_caps.txt)" -k 3
	@echo "the same, two-stage: 50 candidates (5%) by maxsim over the region vectors' FAISS index,"
	@echo "re-ranked by exact SCAN"
	$(CLI) query $(DEMO)/gallery "$$(sed -n 1p $(DEMO)/data/test_caps.txt)" \
		"$$(sed -n 7p $(DEMO)/data/test_caps.txt)" -k 3 --shortlist 50 --first-stage maxsim
	@echo "image query: test image 2, ground truth its captions 2:0 .. 2:4"
	$(PY) -c "import numpy as np; np.save('$(DEMO)/query.npy', np.load('$(DEMO)/data/test_ims.npy')[2:3])"
	$(CLI) query $(DEMO)/gallery --image-features $(DEMO)/query.npy -k 5
	@echo "the same, two-stage: 50 of the 5000 captions (1%) by maxsim, re-ranked by exact SCAN"
	$(CLI) query $(DEMO)/gallery --image-features $(DEMO)/query.npy -k 5 --shortlist 50
	@echo "an int8 gallery, searched exactly on its stored codes by the int8 scorer"
	@echo "(calibrate --precision int8 gated and wrote it), then the same against the float scorer"
	$(CLI) index $(DEMO)/bundle --features $(DEMO)/data/test_ims.npy \
		--captions $(DEMO)/data/test_caps.txt --out $(DEMO)/gallery-int8 --dtype int8
	$(CLI) query $(DEMO)/gallery-int8 "$$(sed -n 1p $(DEMO)/data/test_caps.txt)" \
		"$$(sed -n 7p $(DEMO)/data/test_caps.txt)" -k 3 --scorer int8
	$(CLI) query $(DEMO)/gallery-int8 --image-features $(DEMO)/query.npy -k 5 --scorer int8
	$(CLI) bench $(DEMO)/gallery-int8 --batch 1 --batch 32 --iterations 10 --scorer float
	$(CLI) bench $(DEMO)/gallery-int8 --batch 1 --batch 32 --iterations 10 --scorer int8
	@echo "explain: test caption 0 and its image; each word's attention over the image's boxes"
	$(CLI) explain $(DEMO)/bundle --data $(DEMO)/data --image 0 --caption 0 \
		--png $(DEMO)/explain.png
	@echo "the attention picture of a text query's top hit in the gallery (test caption 6)"
	$(CLI) query $(DEMO)/gallery "$$(sed -n 7p $(DEMO)/data/test_caps.txt)" -k 3 \
		--explain-png $(DEMO)/explain-hit.png
	@echo "serve: the gallery over HTTP for a moment (loopback), one text query through the API"
	$(CLI) serve $(DEMO)/gallery --port $(DEMO_PORT) & server=$$!; \
	for i in $$(seq 100); do $(PY) -c "import urllib.request as u; \
		u.urlopen('http://127.0.0.1:$(DEMO_PORT)/readyz')" 2>/dev/null && break; sleep 0.2; done; \
	$(PY) -c "import json, sys, urllib.request as u; \
		body = json.dumps({'queries': [sys.argv[1]], 'k': 3}).encode(); \
		r = u.Request('http://127.0.0.1:$(DEMO_PORT)/v1/search/text', body, \
			{'content-type': 'application/json'}); \
		print(json.dumps(json.load(u.urlopen(r))['results'][0], indent=1))" \
		"$$(sed -n 1p $(DEMO)/data/test_caps.txt)"; status=$$?; \
	kill -TERM $$server; wait $$server; exit $$status

clean:
	rm -rf $(DEMO)
