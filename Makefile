# labkit: `make report` and `make test` are the two quick-start commands; each sets up .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch lies on this disk; a plain `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine run `make TORCH_SPEC= test` to keep the torch you have.
TORCH_SPEC ?= torch==2.13.0
export LABKIT_CACHE ?= $(HOME)/.cache/labkit

.PHONY: venv report test lab lint clean dist course site gpu-check gpu-rehearse gpu-wheels browser notebooks-html readme

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	test -z "$(TORCH_SPEC)" || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip uninstall -q -y labkit 2>/dev/null || true  # the kit's distribution was called labkit before 0.1.0's rename
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
readme: venv  # README's headline table, from the reference records (a test keeps them equal)
	$(BIN)/python -c "from labkit.report import update_readme; update_readme('README.md')"
	$(BIN)/python -c "from labkit.course import write_course_page; write_course_page()"

notebooks-html: venv
	mkdir -p reports/notebooks
	for nb in notebooks/*.ipynb; do LABKIT_QUICK=1 $(BIN)/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.timeout=600 --output-dir reports/notebooks "$$nb" || exit 1; done
	$(BIN)/labkit report

# sdist + wheel for workshops and Colab, built in a throwaway environment (no dev venv needed); the wheel carries
# every asset and reference record the notebooks read (tests/test_colab_install.py checks it).
dist:
	rm -rf dist
	d=$$(mktemp -d) && $(PY) -m venv $$d && $$d/bin/pip install -q build && $$d/bin/python -m build -q --outdir dist . \
		&& rm -rf $$d
	@ls -l dist

# The folder an instructor hands out: the wheel, every notebook, START_HERE.md. With REPO=OWNER/REPO (and REF, default
# main) each notebook gets a real Open-in-Colab deep link; without REPO, no badge at all.
COURSE ?= labkit-course
REF    ?= main
course: dist
	PYTHONPATH=$(CURDIR) $(PY) -m labkit.course build $(COURSE) --wheel $$(ls dist/*.whl) \
		$(if $(REPO),--repo $(REPO) --ref $(REF))

# The course website (Sphinx + myst-nb, offline): every lesson executed in quick mode (cached: a rebuild re-runs only
# changed lessons; the first build takes about as long as the notebooks in make test), measured results, guides, API.
# REPO=OWNER/REPO adds Colab deep links; LESSONS=00,05 executes only those lessons. Opens at site/html/index.html.
SITE    ?= site
site: venv
	$(BIN)/labkit site $(SITE) $(if $(REPO),--repo $(REPO) --ref $(REF)) $(if $(LESSONS),--lessons $(LESSONS))

lint: venv
	$(BIN)/ruff check labkit tests

# On the lent GPU machine, with the torch it has (no venv): the check in parts of about 5 minutes, one tarball a
# part in GPU_OUT (scripts/gpu_check.py says how the parts were sized). Carry .whl (make gpu-wheels) and run e.g.
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site make gpu-check GPU_OUT=$OUT
GPU_PARTS ?= all
GPU_OUT   ?= results/gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(PY) scripts/gpu_check.py --part $(GPU_PARTS) --out $(GPU_OUT)

# The same parts on this CPU at the smallest sizes, same random models, same tarballs (CI runs it as a test).
gpu-rehearse: venv
	$(BIN)/python scripts/gpu_check.py --rehearse --part $(GPU_PARTS) --out $(GPU_OUT)

# Wheels the lent GPU machine lacks (its image has torch, transformers, onnx, onnxruntime, hypothesis, pytest ...;
# it reaches no registry): for its Python 3.12, x86-64, only what is missing. Carry .whl (about 45 MB).
GPU_WHEELS := bitsandbytes==0.50.2 torch-pruning==1.6.1
gpu-wheels:
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)
	@ls -l .whl; du -sh .whl

lab: venv
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) reports .pytest_cache dist build labkit-course site
