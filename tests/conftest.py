import os
import sys
from pathlib import Path

# One intra-op thread per process: the suite spawns 2-rank gloo jobs on a 2-core box, and
# oversubscribed OpenMP threads made small ops 10-100x slower there (measured on the pooling
# filter). Set before torch is imported; spawned ranks inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests run from a checkout, installed or not
    sys.path.insert(0, str(ROOT))
