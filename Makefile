# make demo: set up and run the main job on the embedded default.
# make test: set up and run the test suite.
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo
SEEDS_RUN_DIR ?= runs/demo_seeds

.PHONY: demo demo-seeds test setup clean-venv

$(BIN)/.installed-base: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

# The test install includes the base one: `make demo` after `make setup` installs nothing again.
$(BIN)/.installed-test: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV) test
	touch $@ $(BIN)/.installed-base

setup: $(BIN)/.installed-test

demo: $(BIN)/.installed-base
	$(BIN)/orlhf pipeline run_dir=$(RUN_DIR)
	@echo "demo: the report is $(RUN_DIR)/report.md (stage outputs in $(RUN_DIR)/, device-hours in $(RUN_DIR)/ledger.jsonl)"

# The demo over training seeds 0, 1 and 2 (README "Seeds"): one run per seed, then the report across them.
demo-seeds: $(BIN)/.installed-base
	$(BIN)/orlhf pipeline run_dir=$(SEEDS_RUN_DIR) 'pipeline.seeds=[0,1,2]'
	@echo "demo-seeds: the report across seeds is $(SEEDS_RUN_DIR)/seeds_report.md (each seed's run in $(SEEDS_RUN_DIR)/seed_<s>/)"

# The Slurm integration tests need a real (two-node, simulated) Slurm; it is installed when this
# machine can (root with apt-get), otherwise those tests say why they skip.
test: $(BIN)/.installed-test
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash scripts/local_slurm.sh install; \
	else echo "test: not root or no apt-get, so the Slurm integration tests will be skipped"; fi
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

clean-venv:
	rm -rf $(VENV)
