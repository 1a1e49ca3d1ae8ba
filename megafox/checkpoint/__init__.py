"""megafox checkpoints: megatron-core dist_checkpointing (torch_dist) plus a small record.

One package for every checkpoint concern, used by the trainer and by `checkpoints_tools` (which
keeps only the command lines), so it sits below both:

    layout.py     paths, `latest`, listing and rotation (what is on disk, which one is current)
    state.py      what a training save holds: model + optimizer sharded state dicts, RNG streams
    sharding.py   the distributed optimizer's ranges as rectangles of the global tensors
    saver.py      CheckpointSaver (synchronous or asynchronous) and the commit protocol
    writer.py     the shards written by threads of the training process
    loader.py     a resume (model, optimizer, RNG) and model-only loads
    integrity.py  digests at save, `check_usable` before a resume, `find_usable_checkpoint`
    safe_load.py  unpickling that admits data only
    run_lock.py   one training run per checkpoint directory
    reader.py     the offline, tensor-by-tensor reader the tools use (no process group)
    errors.py     CheckpointError and friends: one line naming the file

The record each checkpoint carries (megafox.json) is megafox.records.CheckpointRecord.
Importing this package imports nothing; import the module that does the job.
"""
