"""Benchmarks and the GPU check, each run as ``python -m bench.NAME``: kernels (the fused ops),
train_step (one training step), model_speed (the network), eval_speed (the evaluator),
gpu_check (correctness and speed on one GPU; gpu_check.sh installs the carried wheels first);
measure.py holds the measurement code they share."""
