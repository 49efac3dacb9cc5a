"""The distributed runtime: launcher detection (launch), DDP/DeepSpeed backends
(backends), atomic resumable checkpoints (checkpoint) and batch-size semantics
(batching). Import the submodules directly; this package imports nothing heavy.
"""
