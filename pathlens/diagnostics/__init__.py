"""Diagnostics: what single layers and components do.

- `dla`: direct logit attribution per head (`head_logit_attribution`) along the answer − wrong unembedding
  direction (`logit_direction`), through the final norm with its scale frozen (`frozen_final_norm`);
- `lens`: the logit lens (`logit_lens` → `Lens`), every layer read through `Model.unembed`;
- `commitment`: the layer after which a prompt's prediction is settled (`commitment` → `Commitment`);
- `heads`: previous-token, duplicate-token, induction, prefix-matching and pattern scores of every head;
- `massive`: massive activations over a corpus (`scan` → `MassiveScan`) and the zero / mean intervention test;
- `lib`: the Local Interaction Basis per residual-stream layer with the PCA baseline (`lib` → `LIB`);
- `training`: interventions held during training (`train` → `Training`; clamp patterns with `previous_token_pattern`,
  `uniform_pattern`).
"""

from pathlens.diagnostics import heads
from pathlens.diagnostics.commitment import Commitment, commitment
from pathlens.diagnostics.dla import frozen_final_norm, head_logit_attribution, logit_direction
from pathlens.diagnostics.lens import Lens, logit_lens
from pathlens.diagnostics.lib import LIB, lib
from pathlens.diagnostics.massive import MassiveScan, intervention_test, scan
from pathlens.diagnostics.training import Training, train

__all__ = [
    "LIB",
    "Commitment",
    "Lens",
    "MassiveScan",
    "Training",
    "commitment",
    "frozen_final_norm",
    "head_logit_attribution",
    "heads",
    "intervention_test",
    "lib",
    "logit_direction",
    "logit_lens",
    "scan",
    "train",
]
