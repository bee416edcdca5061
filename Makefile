# One command sets up and runs the main job, one sets up and passes the tests (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

# The Spark engine's extra (chainfold[spark]). PySpark is published as a ~435 MB sdist only; its
# wheel is built once per machine into WHEELS (under a lock, so parallel setups build it once) and
# every venv installs from there: download + build ~35 s cold, install ~6 s warm.
PYSPARK_VERSION ?= 4.3.0
WHEELS  ?= $(HOME)/.cache/chainfold/wheels
PYSPARK_WHEEL = $(WHEELS)/pyspark-$(PYSPARK_VERSION)-py2.py3-none-any.whl

.PHONY: setup setup-spark demo test test-fast test-apache bench spark-wheel clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,watch]'
	touch $@

setup: $(BIN)/.installed

# built in a temporary dir and moved into place: an interrupted build leaves no wheel behind
$(PYSPARK_WHEEL): | $(BIN)/.installed
	mkdir -p $(WHEELS)
	flock $(WHEELS)/.build.lock sh -c 'set -e; [ -f $@ ] && exit 0; t=$$(mktemp -d $(WHEELS)/.build.XXXXXX); \
	  trap "rm -rf $$t" EXIT; $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $$t pyspark==$(PYSPARK_VERSION); \
	  mv $$t/$(notdir $@) $@'

spark-wheel: $(PYSPARK_WHEEL)

$(BIN)/.spark-installed: $(BIN)/.installed $(PYSPARK_WHEEL)
	$(BIN)/pip install -q --find-links $(WHEELS) 'pyspark==$(PYSPARK_VERSION)' -e '.[dev,spark]'
	touch $@

setup-spark: $(BIN)/.spark-installed

demo: setup
	$(BIN)/chainfold demo

# scripts/ensure-chromium installs Debian's chromium (as root) for the HTML report's browser tests;
# without it those tests skip and say why. The Spark tests must not skip here: the extra is installed.
test: setup-spark
	-scripts/ensure-chromium >/dev/null
	CHAINFOLD_TEST_REQUIRE_SPARK=1 $(BIN)/pytest -q
	CHAINFOLD_TEST_REQUIRE_SPARK=1 scripts/test-apache

test-fast: setup
	-scripts/ensure-chromium >/dev/null
	$(BIN)/pytest -q -m "not slow"

test-apache: setup
	scripts/test-apache

bench: setup
	$(BIN)/chainfold bench

clean:
	rm -rf $(VENV) .chainfold .pytest_cache .hypothesis test-artifacts
