"""One module per op: its argument checks, the fake kernels of its ``torch.ops.visionzip`` schemas,
its registry entries for the compiled extension, and its public entry (``compress.py``: compress /
compress_with_indices; ``scores.py``: cls_scores / received_scores; ``group_pool.py``: group_pool /
group_pool_with_labels)."""
