"""CLLM training: trajectories, losses, trainer. Needs torch and transformers, not vLLM."""
