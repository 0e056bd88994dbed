"""Claim files (``experiments/reproduce/<claim>.yaml``): a paper's claim, the sweep that tests it at CPU scale
and the comparisons whose verdicts decide it. Validated before anything runs; plain Python, no Ray.

A claim file holds:

- ``claim`` (its name), ``title``; ``paper``: ``source`` (paper, table or figure) and ``rows``, the paper's
  number (or words, e.g. ``fail``) for the settings of our table; ``departures``: where the scaled setting
  departs from the paper's; ``chosen``: how the task and settings were chosen (before any verdict);
- ``sweep``: a sweep spec (the schema of ``experiments/sweeps/``, without ``name``; ``mocolab reproduce``
  names it); its ``base.config`` is relative to the claim file;
- ``values`` (optional): names for long values of a key (``data.augment: {v1: [...ops], v2: [...ops]}``), so
  that the space, the rows and the checks can write ``data.augment: v1`` and tables show ``v1``;
- ``metric`` (default ``knn_top1``; the verdict's metric, chosen with the claim) and ``checks``: ``a RELATION b``
  with ``margin`` (see :mod:`mocolab.analysis.verdict`), where ``a`` is a setting (dotted keys -> values, a subset
  of one trial's values) and ``b`` a setting, ``random_init`` (the random-init encoder of the same seed, measured
  under the same protocol) or a number; a check may name its own ``metric`` (:data:`METRICS`: ``knn_top1``,
  ``lincls_fast_top1`` (the linear probe, ``train.linear_probe``), ``det_AP``/``det_AP50``/``det_AP75``
  (``eval.detection``), ``loss``, ``loss_to_chance`` = final loss / ln(1 + negatives), ``loss_max_rise`` and
  ``knn_max_drop``: the largest loss spike and kNN dip of a run's curve, ``evidence.CURVE_METRICS``);
- ``all_runs_finish`` (optional, default false): one more check, that every run (each trial, and each random-init
  detection run) reached its last iteration without a NaN/inf loss; not reproduced if any did not, the report
  naming it.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mocolab.config import ConfigError, format_validation_error, read_yaml
from mocolab.tune.spec import SweepSpec, assignment_of, axis_keys, parse_sweep

CLAIMS_DIR = Path(__file__).resolve().parents[3] / "experiments" / "reproduce"
RANDOM_INIT = "random_init"
Setting = dict[str, Any]
Metric = Literal[
    "knn_top1",
    "lincls_fast_top1",
    "det_AP",
    "det_AP50",
    "det_AP75",
    "loss",
    "loss_to_chance",
    "loss_max_rise",
    "knn_max_drop",
]
BASELINE_METRICS = ("knn_top1", "lincls_fast_top1", "det_AP", "det_AP50", "det_AP75")
"""The metrics a random-init encoder is measured on (``b: random_init``), in the order tables show them."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PaperRow(_Strict):
    """The paper's number for one setting of our table (a number, or words such as ``fail``)."""

    setting: Setting
    value: float | str


class Paper(_Strict):
    source: str = Field(description="paper, section, table or figure the numbers come from")
    rows: list[PaperRow] = Field(default_factory=list)


class Check(_Strict):
    """One comparison ``a RELATION b`` over seeds; its verdict follows mocolab.analysis.verdict."""

    name: str
    a: Setting
    relation: Literal[">", ">=", "<=", "~"]
    b: Setting | Literal["random_init"] | float
    margin: float = Field(0.0, ge=0)
    metric: Metric | None = None
    role: Literal["claim", "diagnostic"] = Field(
        "claim",
        description="diagnostic: decided and reported, but not part of the claim's verdict (a measurement of why)",
    )
    effect: float | None = Field(
        None,
        description="the difference a - b expected (the paper's, in points), for the seeds-needed estimate; "
        "default: the observed mean difference",
    )


class Claim(_Strict):
    """A claim file (see the module docstring)."""

    claim: str
    title: str
    paper: Paper
    departures: str
    chosen: str
    sweep: dict[str, Any]
    values: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric: Metric = "knn_top1"
    checks: list[Check] = Field(min_length=1)
    all_runs_finish: bool = Field(False, description="check that every run ends without failure or NaN/inf loss")

    @field_validator("checks")
    @classmethod
    def _one_claim_check(cls, v: list[Check]) -> list[Check]:
        if not any(check.role == "claim" for check in v):
            raise ValueError("checks: at least one check must have role: claim (diagnostics do not decide a claim)")
        return v

    @field_validator("sweep")
    @classmethod
    def _no_name(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "name" in v:
            raise ValueError("sweep.name: leave it out; mocolab reproduce names each claim's sweep")
        return v

    def metric_of(self, check: Check) -> str:
        return check.metric or self.metric

    def resolve(self, setting: Setting) -> Setting:
        """``setting`` with named values (``values:``) replaced by what they name."""
        return {
            key: self.values.get(key, {}).get(value, value) if _hashable(value) else value
            for key, value in setting.items()
        }

    def grid(self) -> list[Setting]:
        """Every trial's swept values as written in the claim (named values kept: the table's row labels)."""
        return grid_settings(
            parse_sweep({"name": f"reproduce-{self.claim}", **self.sweep}, source=f"claim {self.claim}")
        )

    def resolved_sweep(self) -> dict[str, Any]:
        """The sweep spec with named values replaced, as the trials run it."""
        space = {}
        for key, axis in (self.sweep.get("space") or {}).items():
            keys = axis_keys(key)
            axis = dict(axis) if isinstance(axis, dict) else axis
            if isinstance(axis, dict) and isinstance(axis.get("grid"), list):
                if len(keys) > 1:
                    axis["grid"] = [
                        list(self.resolve(dict(zip(keys, v))).values()) if isinstance(v, list) else v
                        for v in axis["grid"]
                    ]
                else:
                    axis["grid"] = [self.resolve({keys[0]: v})[keys[0]] for v in axis["grid"]]
            space[key] = axis
        return {**self.sweep, "space": space}


def _hashable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def claim_path(name: str, folder: Path = CLAIMS_DIR) -> Path:
    """The file of claim ``name`` (or ``name`` itself when it is a path to a file)."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path.resolve()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no claim '{name}': {path} does not exist; claims there: {', '.join(list_claims(folder))}")
    return path


def list_claims(folder: Path = CLAIMS_DIR) -> list[str]:
    """The claim names in ``folder`` (file stems), in file-name order."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def grid_settings(spec: SweepSpec) -> list[Setting]:
    """Every trial's swept values (seeds apart): the product of the grid axes (zipped axes unzipped)."""
    axes = [[assignment_of(key, value) for value in (axis.values or [])] for key, axis in spec.space.items()]
    settings = []
    for combo in itertools.product(*axes):
        merged: Setting = {}
        for part in combo:
            merged.update(part)
        settings.append(merged)
    return settings


def same_value(a: Any, b: Any) -> bool:
    """Setting values compare as numbers where both are numbers (``0.9 == "0.9"``), lists and mappings by
    content (an MLflow param holds their Python text), else as text."""
    if isinstance(a, (list, dict)) or isinstance(b, (list, dict)):
        return _literal(a) == _literal(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _literal(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def matches(setting: Setting, trial: Setting) -> bool:
    """Whether ``trial`` has every value of ``setting``."""
    return all(key in trial and same_value(value, trial[key]) for key, value in setting.items())


def _check_setting(where: str, setting: Setting, grid: list[Setting]) -> None:
    hits = [trial for trial in grid if matches(setting, trial)]
    if len(hits) != 1:
        found = "no" if not hits else f"{len(hits)}"
        raise ValueError(
            f"{where}={setting} selects {found} trial setting(s) of the sweep grid {grid}; name exactly one grid point"
        )


def parse_claim(raw: dict[str, Any], source: str) -> tuple[Claim, SweepSpec]:
    """Validate a claim's structure and its sweep spec; every setting must select exactly one grid point.

    Raises ConfigError naming ``source`` and the field."""
    try:
        claim = Claim.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err).replace("invalid config:", f"invalid claim {source}:", 1)
        ) from None
    named = parse_sweep({"name": f"reproduce-{claim.claim}", **claim.sweep}, source=f"{source} (sweep)")
    if named.search != "grid" or any(axis.grid is None for axis in named.space.values()):
        raise ConfigError(f"{source}: sweep.space must be grid axes (a claim compares fixed settings)")
    spec = parse_sweep({"name": f"reproduce-{claim.claim}", **claim.resolved_sweep()}, source=f"{source} (sweep)")
    grid = grid_settings(named)
    try:
        for i, row in enumerate(claim.paper.rows):
            _check_setting(f"paper.rows[{i}].setting", row.setting, grid)
        for i, check in enumerate(claim.checks):
            _check_setting(f"checks[{i}].a", check.a, grid)
            if isinstance(check.b, dict):
                _check_setting(f"checks[{i}].b", check.b, grid)
            elif check.b == RANDOM_INIT and claim.metric_of(check) not in BASELINE_METRICS:
                raise ValueError(
                    f"checks[{i}]: b=random_init compares {', '.join(BASELINE_METRICS)} only, not "
                    f"{claim.metric_of(check)}; set the check's metric to one of them"
                )
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    return claim, spec


def load_claim(name: str, folder: Path = CLAIMS_DIR) -> tuple[Claim, SweepSpec, Path]:
    """Read and validate claim ``name`` (a name in ``folder`` or a path): ``(claim, sweep spec, file)``."""
    path = claim_path(name, folder)
    raw = read_yaml(path)
    if raw.get("claim") != path.stem:
        raise ConfigError(f"{path}: claim: {raw.get('claim')!r} must be the file's name '{path.stem}'")
    claim, spec = parse_claim(raw, str(path))
    return claim, spec, path
