"""pathlens: find, verify and steer the pathways inside neural networks.

The nouns: `Model` (an unmodified model plus its sites), `Site` (a named activation point), `Intervention` (one way
to change a site during a run: an `Op` — `Replace`, `Add`, `Ablate`, `Scale`, `Project`, `StopGradient`,
`ProjectOut`, `Affine`, `ScaleSubspace`, `AddDynamic`, `Tap`), `SteeringVector`, `Subspace`, `Task` (the behaviour
to explain), `Scores` and `Graph` (the result types). The verbs: `load`, `generate` (batched generation, steered per
row), `patch`, `atp`, `atp_star`, `relp`, `integrated_gradients`, `compare`, `edge_attribution`; circuits
(`pathlens.circuits.discover`, ...), steering (`pathlens.steering`), task generators and metrics
(`pathlens.tasks.ioi`, ...), subspaces and DAS (`pathlens.subspace`, `illusion_check`), features (activation store,
semi-NMF, sparse dictionaries spliced in as sites: `pathlens.features`), diagnostics (logit lens, head detectors,
massive activations, LIB, `train` with interventions held during training), the Ray executor
(`pathlens.distributed`) and reports live in their packages, which `import pathlens` loads."""

from pathlens import (
    arch,
    attribution,
    circuits,
    diagnostics,
    distributed,
    features,
    patching,
    report,
    results,
    steering,
    subspace,
    tasks,
)
from pathlens.arch.base import ArchMap
from pathlens.attribution import atp, atp_star, compare, integrated_gradients, relp
from pathlens.circuits import edge_attribution
from pathlens.diagnostics import train
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.interventions import (
    Ablate,
    Add,
    AddDynamic,
    Affine,
    Intervention,
    Op,
    Project,
    ProjectOut,
    Replace,
    Scale,
    ScaleSubspace,
    StopGradient,
    Tap,
)
from pathlens.loading import EMBEDDED, load
from pathlens.model import Cache, Model, Run
from pathlens.patching import patch
from pathlens.results import Scores
from pathlens.sites import Site, parse_site
from pathlens.steering import SteeringVector, generate
from pathlens.subspace import Subspace, illusion_check
from pathlens.tasks import Task

__all__ = [
    "EMBEDDED",
    "Ablate",
    "Add",
    "AddDynamic",
    "Affine",
    "ArchMap",
    "Cache",
    "Graph",
    "Intervention",
    "Model",
    "Op",
    "PathlensError",
    "Project",
    "ProjectOut",
    "Replace",
    "Run",
    "Scale",
    "ScaleSubspace",
    "Scores",
    "Site",
    "SteeringVector",
    "Subspace",
    "StopGradient",
    "Tap",
    "Task",
    "arch",
    "atp",
    "atp_star",
    "attribution",
    "circuits",
    "compare",
    "diagnostics",
    "distributed",
    "edge_attribution",
    "features",
    "generate",
    "illusion_check",
    "integrated_gradients",
    "load",
    "parse_site",
    "patch",
    "patching",
    "relp",
    "report",
    "results",
    "steering",
    "subspace",
    "tasks",
    "train",
]
