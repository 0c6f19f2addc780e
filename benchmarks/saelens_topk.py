"""SAELens' TopK SAE trained on saved activations, for `benchmarks/features_sae.py` (run in SAELens' own
virtualenv: SAELens pins transformer-lens 3.x, which cannot share pathlens' environment).

    python saelens_topk.py ACTIVATIONS.safetensors K BATCH LR EPOCHS [THREADS [DEAD_WINDOW]]

Trains `TopKTrainingSAE` (width 8 × d_in, SAELens' defaults otherwise: AuxK, decoder-norm rescaling) with its
own `SAETrainer` on the tensor "x", the rows shuffled each epoch with seed e, with THREADS torch threads (default
1) and latents dead after DEAD_WINDOW steps without firing (default 200), and prints one JSON line with the
training tokens per second (wall time of `fit`, which includes SAELens' per-step bookkeeping).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file


def batches(x: torch.Tensor, batch: int, epochs: int) -> Iterator[torch.Tensor]:
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
        for start in range(0, x.shape[0] - batch + 1, batch):
            yield x[order[start : start + batch]]


def main() -> None:
    path, k, batch, lr, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
    x = load_file(path)["x"].float()
    x = x * math.sqrt(x.shape[1] / float(x.pow(2).sum(-1).mean()))  # the scale pathlens trains at
    d = int(x.shape[1])
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=8 * d, k=k, device="cpu"))
    steps = (x.shape[0] // batch) * epochs
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr,  # constant schedule (SAELens' trainer needs the field set; its config class sets lr / 10)
        device="cpu",
        dead_feature_window=int(sys.argv[7]) if len(sys.argv) > 7 else 200,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg, sae, batches(x, batch, epochs))
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": steps * batch / seconds, "steps": steps, "seconds": seconds}))


if __name__ == "__main__":
    main()
