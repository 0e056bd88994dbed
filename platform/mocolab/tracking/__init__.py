"""MLflow at the edge, one module per concern (mlflow itself is imported where it is called):

- ``names``: every tag, stage, metric and artifact name;
- ``masking``: credential masking (no MLflow code: the CLI and every layer use it);
- ``store``: whether the tracking store can be used, clients on it;
- ``source``: who made a run (source tags, the driver process);
- ``runs``: experiments, creating / resuming / ending runs, params and metrics;
- ``artifacts``: config, dataset input, files, a pretraining run's artifacts, the logged backbone model;
- ``system``: system metrics and compute accounting.

Nothing here imports ``moco/``, ``data/`` or ``weights_io/``: what those know comes in from the caller.
New code imports the concern module; ``from mocolab import tracking`` then ``tracking.NAME`` finds ``NAME`` in the
module that defines it, importing that module on first use.
"""

from importlib import import_module

CONCERNS = ("names", "masking", "store", "source", "runs", "artifacts", "system")


def __getattr__(name: str):
    if name in CONCERNS:
        return import_module(f"{__name__}.{name}")
    for concern in CONCERNS:
        module = vars(import_module(f"{__name__}.{concern}"))
        if name in module and not name.startswith("__"):
            return module[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
