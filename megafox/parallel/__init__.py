"""Parallelism, applied from outside the model (torchtitan's `distributed/` + `parallelize.py`).

process_groups  torch.distributed from torchrun or SLURM, then megatron-core's TP x PP x DP groups
cpu_backend     megatron-core on a CPU-only machine (gloo; CI, tests, the CPU demo)
parallelize     the built chunks wrapped for training: bf16, device, DDP, the distributed optimizer

`megafox.model` builds this rank's chunks (megatron-core's GPTModel picks its layers and vocab
shard from the layout at construction); everything after that is here.
"""
