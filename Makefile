# Two commands for users: `make demo` and `make test`. Both create or reuse .venv/ and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build that this project's machines carry; a GPU user installs their own torch first (see README).
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= data/demo_brain
RUNS_DIR ?= runs/demo
SEED ?= 0

.PHONY: install demo test lint format clean

# The demo's last table: per-class test Dice and HD95 of the trained method beside registration-only's.
define DEMO_TABLE
import sys, pandas as pd
method, reg, name = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2]), sys.argv[3]
reg = reg[(reg.group == "test") & reg.default].groupby("class_name")[["dice", "hd95_mm"]].mean()
t = method.set_index("class_name")[["dice_mean", "hd95_mm_mean"]].rename(columns=lambda c: f"{name}_{c[:-5]}")
t = t.join(reg.rename(columns=lambda c: f"reg_only_{c}"))
t.loc["overall", ["reg_only_dice", "reg_only_hd95_mm"]] = reg.mean().values
print(t.round(3).to_string())
endef
export DEMO_TABLE

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[all]"
	@touch $@

install: $(VENV)/.installed

BUNDLE := bundles/cctr_brain_demo/configs
REG_DIR ?= runs/demo/registration
DEMO_METHOD ?= cctr
DEMO_ITERS ?= 500
DEMO_VAL ?= 100
OUT_ROOT ?= runs/demo/bundle
# registered labels from B-spline pairs: +0.07 test Dice for CCT-R over affine ones (benchmarks/README.md)
REG_KIND ?= bspline
# the user's case, "label one, segment the rest": the validation and test images (never their labels) train as
# unlabelled volumes with their registered labels, as registration-only sees them (benchmarks/README.md, "Transductive")
DEMO_TRANSDUCTIVE ?= True
BUNDLE_ARGS = --dataset_dir $(DEMO_DIR) --registration_dir $(REG_DIR) --registration_kind $(REG_KIND) --output_root $(OUT_ROOT)

# The main job end to end on the embedded demo data on 2 CPU cores from a fresh clone: 10 min 39 s with the full
# install (session 15); 12-12.5 min without it while other jobs shared the cores (session 14). Dataset and affine and
# B-spline registration about 3.5 min, 500 transductive CCT-R iterations about 8 min when the cores were shared
# (session 14), evaluation and inference under 1 min.
demo: install
	@echo "== 1/6 demo dataset (real donor anatomy, synthetic MR) =="
	$(PY) -m monai_ssl.demo --out $(DEMO_DIR) --seed $(SEED)
	$(PY) -m monai_ssl.data validate-datalist $(DEMO_DIR)/datalist.json
	@echo "== 2/6 registration: affine (all pairs, REPS), B-spline (atlas pairs, registered labels), registration-only baseline =="
	$(PY) -m registration precompute --datalist $(DEMO_DIR)/datalist.json --out $(REG_DIR) --kind affine --workers 2
	$(PY) -m registration precompute --datalist $(DEMO_DIR)/datalist.json --out $(REG_DIR) --kind bspline --pairs atlas --workers 2
	$(PY) -m registration select --datalist $(DEMO_DIR)/datalist.json --out $(REG_DIR) --kind $(REG_KIND)
	$(PY) -m registration report --datalist $(DEMO_DIR)/datalist.json --out $(REG_DIR) --kind $(REG_KIND)
	@echo "== 3/6 training $(DEMO_METHOD) with the MONAI bundle ($(DEMO_ITERS) iterations) =="
	$(PY) -m monai.bundle run training --config_file "['$(BUNDLE)/train.json','$(BUNDLE)/methods/$(DEMO_METHOD).json']" \
		$(BUNDLE_ARGS) --max_iterations $(DEMO_ITERS) --val_interval $(DEMO_VAL) --transductive $(DEMO_TRANSDUCTIVE)
	@echo "== 4/6 evaluation on the test case (original grid, mm) =="
	$(PY) -m monai.bundle run evaluating --config_file "['$(BUNDLE)/train.json','$(BUNDLE)/evaluate.json','$(BUNDLE)/methods/$(DEMO_METHOD).json']" \
		$(BUNDLE_ARGS)
	@echo "== 5/6 inference bundle on a test volume =="
	$(PY) -m monai.bundle run --config_file "['$(BUNDLE)/inference.json','$(BUNDLE)/methods/$(DEMO_METHOD).json']" \
		--output_root $(OUT_ROOT) --input_dir $(DEMO_DIR)/datalist.json --uncertainty True \
		--registration_dir $(REG_DIR) --output_dir $(OUT_ROOT)/$(DEMO_METHOD)/inference
	@echo "== 6/6 results: $(DEMO_METHOD) against the registration-only baseline on the same test case =="
	@$(PY) -c "$$DEMO_TABLE" $(OUT_ROOT)/$(DEMO_METHOD)/eval/metrics_summary.csv $(REG_DIR)/$(REG_KIND)/reg_only/per_case.csv $(DEMO_METHOD)
	@echo "registration-only baseline:   $(REG_DIR)/$(REG_KIND)/reg_only/"
	@echo "evaluation tables (CSV):      $(OUT_ROOT)/$(DEMO_METHOD)/eval/metrics_per_case.csv, metrics_summary.csv"
	@echo "overlays (PNG):               $(OUT_ROOT)/$(DEMO_METHOD)/eval/overlays/"
	@echo "predicted label maps (NIfTI): $(OUT_ROOT)/$(DEMO_METHOD)/inference/"
	@echo "training logs (TensorBoard):  $(OUT_ROOT)/$(DEMO_METHOD)/"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
