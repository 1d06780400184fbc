"""Writes tests/assets/bundle_v1: a tiny annotator bundle in the format of commit d708f6c (before the
run-layout redesign of issue 3/8), kept so that every later reader is tested against a bundle that
older code wrote. Run once from the repository root: `python tests/assets/make_bundle_v1.py`."""

from pathlib import Path

import numpy as np
import torch

from finetune.bundle import write_bundle  # the API of 3194c90; since moved to pretrain.layout
from finetune.task import ClassifierTask
from hiceller.config import ModelConfig
from pretrain.model import CellerModel

GENES = [f"GENE{i}" for i in range(20)]
LABELS = ["alpha", "beta", "rare"]

if __name__ == "__main__":
    cfg = ModelConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16, dropout=0.0, attention="sdpa")
    torch.manual_seed(0)
    task = ClassifierTask(CellerModel(cfg, n_genes=len(GENES), n_bins=11), len(LABELS), "ginf", np.array([50, 40, 2]))
    with torch.no_grad():  # a decisive head, so a change in what the encoder sees shows in the probabilities
        task.head.weight.mul_(60.0)
    # The format of d708f6c: GInf's buffer left out, no "head" key (a transformer head).
    state = {k: v for k, v in task.state_dict().items() if not k.startswith("ginf.")}
    write_bundle(Path(__file__).parent / "bundle_v1", state, cfg, 11, 16, GENES, LABELS, [50, 40, 2],
                 metrics={"val": {"macro_f1": 0.5}}, input_genes=GENES[:12])
