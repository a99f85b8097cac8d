import os

# Tests never touch a hub: every model is built tiny and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread, here and in every subprocess a test starts: equivalence tests compare runs split over
# processes bit for bit, and a different thread count changes the order of float reductions.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
