def split_dataset_by_node(*a, **k):
    raise ImportError("HF `datasets` is not installed (bench/titan_baseline stub)")
