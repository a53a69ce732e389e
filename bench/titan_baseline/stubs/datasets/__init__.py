"""Stub for HF `datasets`: torchtitan imports it at module import time (hf_datasets/text_datasets.py,
via components/validate.py) even when a custom/synthetic dataloader is used. Used only where `datasets` is not installed;
any real use raises."""
class Dataset:  # noqa: D401
    def __init__(self, *a, **k):
        raise ImportError("HF `datasets` is not installed (bench/titan_baseline stub)")
class IterableDataset(Dataset):
    pass
def load_dataset(*a, **k):
    raise ImportError("HF `datasets` is not installed (bench/titan_baseline stub)")
