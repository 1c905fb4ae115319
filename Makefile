# make demo: set up and run the main job on the embedded default.
# make test: set up and run the test suite.
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo

.PHONY: demo test setup clean-venv

$(BIN)/.installed-%: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV) $*
	touch $@

setup: $(BIN)/.installed-test

demo: $(BIN)/.installed-plot
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 2 -m offline_rlhf.cli demo parallel=tp2 run_dir=$(RUN_DIR)
	@echo "demo: outputs in $(RUN_DIR)/demo, device-hours in $(RUN_DIR)/ledger.jsonl"

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
