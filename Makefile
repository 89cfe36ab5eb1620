# Two commands from a fresh clone: `make run` and `make test`.
# Both install what they need: Debian packages (as root) and the Python venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_STAMP := .deb-packages.stamp
DEB_TEST_STAMP := .deb-packages-test.stamp
PYTEST_ARGS ?=

.PHONY: run test fuzz lint bench deps venv clean help

help:
	@echo "make run    start the appliance on embedded defaults (data under ./var)"
	@echo "make test   lint + the test suite with real DICOM peers (DCMTK, Orthanc)"
	@echo "make fuzz   the DICOM door's fuzzers, long (FUZZ_EXAMPLES=20000; make test runs 200)"
	@echo "make bench  receive against storescp/Orthanc, codecs, the conversion check, forwarding, disk copies"

deps: $(DEB_STAMP)

$(DEB_STAMP): scripts/debian-packages.txt scripts/ensure-debian-packages.sh
	bash scripts/ensure-debian-packages.sh scripts/debian-packages.txt
	touch $@

$(DEB_TEST_STAMP): scripts/debian-packages-test.txt scripts/ensure-debian-packages.sh
	bash scripts/ensure-debian-packages.sh scripts/debian-packages-test.txt
	touch $@

venv: $(STAMP)

$(STAMP): pyproject.toml $(DEB_STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,systemd]'
	touch $@

run: $(STAMP)
	$(BIN)/appliance run

lint: $(STAMP)
	$(BIN)/ruff check appliance tests bench

test: lint $(DEB_TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider --timeout 3600 tests/test_fuzz_door.py

bench: $(STAMP) $(DEB_TEST_STAMP)
	$(BIN)/python bench/receive.py
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/disks.py

clean:
	rm -rf $(VENV) $(DEB_STAMP) $(DEB_TEST_STAMP) .pytest_cache
