"""Result types and their files: `Scores` (the labelled tensor every method returns), its plots, atomic IO.

- `scores`: the `Scores` type (`from pathlens.results import Scores`);
- `plots`: PNG heatmaps / bar charts of a `Scores` and the shared diverging colour map;
- `io`: atomic writes of bytes, text and safetensors, and the safetensors + JSON pairs results are saved as.
"""

from pathlens.results.io import FORMAT_VERSION, load_pair, save_pair
from pathlens.results.scores import Scores

__all__ = ["FORMAT_VERSION", "Scores", "load_pair", "save_pair"]
