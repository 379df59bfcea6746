# labkit: `make report` and `make test` are the two quick-start commands; each sets up .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch lies on this disk; a plain `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine run `make TORCH_SPEC= test` to keep the torch you have.
TORCH_SPEC ?= torch==2.13.0
export LABKIT_CACHE ?= $(HOME)/.cache/labkit

.PHONY: venv report test lab lint clean dist gpu-check gpu-wheels browser notebooks-html

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	test -z "$(TORCH_SPEC)" || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,lab]"
	touch $@

venv: $(BIN)/.installed

report: venv
	$(BIN)/labkit fetch
	for e in $$($(BIN)/python -c "from labkit.experiments import available; print(' '.join(available()))"); do \
		$(BIN)/labkit run $$e --quick || exit 1; done
	$(BIN)/labkit report
	@echo "open reports/index.html"

# Browser tests drive Debian's chromium through Playwright; on Linux as root it is installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(uname)" = Linux ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } \
		|| echo "chromium is not installed: the browser tests will skip"

test: venv browser
	LABKIT_QUICK=1 $(BIN)/python -m pytest tests --nbmake notebooks -p no:cacheprovider

# The notebooks executed in quick mode and rendered to HTML next to the report, which links each section to its
# notebook (about 8 minutes on 2 cores; separate from `make report` to keep that one under its time budget).
notebooks-html: venv
	mkdir -p reports/notebooks
	for nb in notebooks/*.ipynb; do LABKIT_QUICK=1 $(BIN)/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.timeout=600 --output-dir reports/notebooks "$$nb" || exit 1; done
	$(BIN)/labkit report

# sdist + wheel for workshops and Colab: the wheel carries every asset the kit loads (tokenizer, sentences).
dist: venv
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	@ls -l dist

lint: venv
	$(BIN)/ruff check labkit tests

# On a CUDA machine, with the torch it has (no venv): -m gpu tests + every experiment's quick GPU run,
# records under results/reference/<gpu-name>/. Whoever has a GPU runs this first.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PY) scripts/gpu_check.py

# Wheels the lent GPU machines lack and cannot download (they reach no registry); carry wheels/ there.
gpu-wheels: venv
	$(BIN)/pip download -q --no-deps -d wheels hypothesis sortedcontainers attrs fastapi starlette uvicorn h11 \
		httpx httpcore anyio sniffio idna certifi click annotated-doc gguf "bitsandbytes>=0.47" \
		torch-pruning onnx onnxscript onnx-ir ml-dtypes

lab: venv
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) reports .pytest_cache dist build
