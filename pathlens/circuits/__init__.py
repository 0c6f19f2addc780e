"""Circuits: which edges between model components carry a behaviour, and how faithful that explanation is.

- `edge_attribution(model, task, method="eap" | "eap-ig" | "relp")`: every edge scored in one backward (a `Graph`);
- `discover(model, task, method=...)`: a circuit (a pruned `Graph`) found by edge attribution, exact edge
  patching or ACDC, measured by exact edge patching; `pathways(patcher, circuit)`: its top-K diverse
  input → logits routes, each with its own patching check;
- `EdgePatcher`: exact edge patching, many circuits per batched forward; `faithfulness`, `faithfulness_curve`
  (a `Curve`) and `completeness` measure circuits with it; `edge_effects` scores single edges exactly;
- `path_patch`: sender → receivers path patching, batched over senders;
- `neuron_path` / `neuron_path_module`: NeuronPath, one neuron per layer by joint integrated gradients;
- `top_paths`: the K best (optionally diverse) paths of a scored graph; `graph_layout`: a model's senders and
  receivers (`Layout`), including the latents and error node of each spliced dictionary (`latent_families`,
  `LatentFamily`): while a transcoder, an `mlp_out` / `attn_out` SAE or a residual SAE is spliced, every edge
  method above treats its latents as nodes.

`discover`, `faithfulness` and `neuron_path` are functions named like the modules that hold them: here the
name is the function (`pathlens.circuits.discover(model, task)`), while the modules stay importable by path
(`from pathlens.circuits.discover import pathways`).
"""

from pathlens.circuits import mib
from pathlens.circuits.discover import DISCOVERY_METHODS, discover, pathways
from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.circuits.edge_effects import edge_effects
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import Curve, completeness, faithfulness, faithfulness_curve
from pathlens.circuits.layout import LatentFamily, Layout, graph_layout, latent_families
from pathlens.circuits.neuron_path import NeuronPathResult, neuron_path, neuron_path_module
from pathlens.circuits.path_patching import path_patch
from pathlens.paths import Path, top_paths

__all__ = [
    "DISCOVERY_METHODS",
    "Curve",
    "EdgePatcher",
    "LatentFamily",
    "Layout",
    "NeuronPathResult",
    "Path",
    "completeness",
    "discover",
    "edge_attribution",
    "edge_effects",
    "faithfulness",
    "faithfulness_curve",
    "graph_layout",
    "latent_families",
    "mib",
    "neuron_path",
    "neuron_path_module",
    "path_patch",
    "pathways",
    "top_paths",
]
