# Set-up is shared by every target: a .venv from requirements.lock, then the offline datasets.
# A re-run skips what is already there (stamp files).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# absolute: Ray Tune runs each trial in a directory of its own
DATA   := $(abspath $(or $(TINA_DATA_DIR),data))
DATA_STAMP := $(DATA)/.ready
BROWSER := $(VENV)/.browser
CONFIG ?= configs/demo.yaml
OUT    ?= runs/demo
SEED   ?= 0

.PHONY: setup data demo test lint clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

data: $(DATA_STAMP)

$(DATA_STAMP): scripts/fetch_data.sh
	bash scripts/fetch_data.sh $(DATA)

demo: $(STAMP) $(DATA_STAMP)
	TINA_DATA_DIR=$(DATA) $(VENV)/bin/tina pipeline --config $(CONFIG) --out $(OUT) --seed $(SEED)

# tests/test_web.py drives Debian's chromium through Playwright (which never downloads a browser)
$(BROWSER): $(STAMP)
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $@

test: $(STAMP) $(DATA_STAMP) $(BROWSER)
	TINA_DATA_DIR=$(DATA) $(PY) -m pytest --durations=25 -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DATA) runs
