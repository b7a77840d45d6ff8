"""src/train.py, with one probe when the fit starts (after the module's on_fit_start): how many of a parallel op's results on subnormal
floats are themselves subnormal, on every intra-op thread the run has (trainer.flush_denormal's promise: none).

Nothing else changes: the entry point, the build and the fit are the real ones. The probe's op is split over
torch's intra-op threads, so a thread that keeps subnormals shows as its share of the results.
"""

import runpy
import sys
from pathlib import Path

import torch

from descent.engine.loop import Classifier

on_fit_start = Classifier.on_fit_start


def probed_on_fit_start(self):
    on_fit_start(self)
    x = torch.full((1 << 24,), 1e-39)  # subnormal in float32 (smallest normal: 1.18e-38)
    y = x * 0.5
    subnormal = int(((y != 0) & (y.abs() < torch.finfo(torch.float32).tiny)).sum())
    print(f"subnormal results: {subnormal} of {y.numel()} on {torch.get_num_threads()} threads", flush=True)


Classifier.on_fit_start = probed_on_fit_start
script = Path(__file__).resolve().parents[1] / "src" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
