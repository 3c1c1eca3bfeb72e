"""Benchmarks: ``python -m benchmarks`` (step time, memory, FLOPs, bank build; ours against a plain PyTorch loop),
``python -m benchmarks.real_shape`` (each SD1.5 recipe through train.py on the CPU), ``benchmarks/gpu_check.sh``
(one prepared command for a GPU machine) and ``benchmarks/bank_checksum.py`` (bank checksum cost)."""
