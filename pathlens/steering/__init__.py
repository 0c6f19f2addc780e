"""Steering: change a behaviour by adding vectors to activations while the model generates, and measure it.

- `SteeringVector` (vector.py): (site, vector) pairs, how they apply, where they came from; save/load, arithmetic,
  `with vec.applied(model):`, `.interventions()`.
- `generate` (generate.py): batched, left-padded, key/value-cached generation with steering per row.
- finders (finders.py): `mean_difference` (ActAdd/CAA, `ab_prompts`), `pca_direction` (RepE), `probe_direction`,
  `select_layer`, from contrast data at any site and read position.
- directional ablation (ablation.py): `ablation_interventions` (run time) and `orthogonalized` (a weight copy).
- evaluation (evaluate.py): `vader_scores`, `token_set_probability`, `perplexity`, `next_token_kl`,
  `next_token_entropy`, `cost`; `sweep` (sweep.py): dose–response table, PNG and JSON summary.
- why it works (explain.py): `explain` attributes the steered-vs-unsteered change of a concept metric (token-set
  logit difference) to heads, MLPs and edges (AtP/EAP with the steered run as the clean run) and lists the
  pathways from the vector's write to the logits.
- shipped data (data/): `contrast(name)`, `neutral_prompts()`, `heldout_text()`.
- learned steering (learned/, loaded with this package): Linear-AcT, LinEAS, the weighted controller, EigenShift.
"""

from pathlens.steering import learned
from pathlens.steering.ablation import ablation_interventions, orthogonalized, probe_after_ablation
from pathlens.steering.data import contrast, heldout_text, neutral_prompts
from pathlens.steering.evaluate import (
    cost,
    next_token_entropy,
    next_token_kl,
    perplexity,
    token_set_probability,
    vader_scores,
)
from pathlens.steering.explain import Explanation, TokenSetDifference, concept_task, explain
from pathlens.steering.finders import (
    ab_prompts,
    find,
    layer_sites,
    mean_difference,
    pca_direction,
    probe_direction,
    read_activations,
    select_layer,
)
from pathlens.steering.generate import Generation, Steerer, generate
from pathlens.steering.sweep import SweepResult, sweep
from pathlens.steering.vector import SteeringVector

__all__ = [
    "Explanation",
    "Generation",
    "Steerer",
    "SteeringVector",
    "SweepResult",
    "TokenSetDifference",
    "ab_prompts",
    "ablation_interventions",
    "concept_task",
    "contrast",
    "cost",
    "explain",
    "find",
    "generate",
    "heldout_text",
    "layer_sites",
    "learned",
    "mean_difference",
    "neutral_prompts",
    "next_token_entropy",
    "next_token_kl",
    "orthogonalized",
    "pca_direction",
    "perplexity",
    "probe_after_ablation",
    "probe_direction",
    "read_activations",
    "select_layer",
    "sweep",
    "token_set_probability",
    "vader_scores",
]
