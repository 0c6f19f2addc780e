"""pathlens benchmarks: one script per area (`patching`, `attribution`, `circuits`) and what they share (`common`).

Run a script from the repository root as `python benchmarks/patching.py` or `python -m benchmarks.patching`;
see benchmarks/README.md. Importing this package turns tqdm's progress bars off (TransformerLens' loops draw
them on stderr). tqdm reads TQDM_* variables when it is imported, which `import torch` already does, so the
setting lives here, where it runs before any script's own imports.
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
