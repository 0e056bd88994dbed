"""Sweep files: the schema of ``experiments/sweeps/*.yaml`` and the per-trial run configs it implies.

A sweep file names a base run config, a search space over dotted config keys, seeds, the search
algorithm, the scheduler and the resources per trial. ``load_sweep`` validates the file and every
trial config it can produce (with ``mocolab.config.build_config``) before any trial starts, so a bad
key or an impossible value is refused with the key and the value named. Plain Python: no Ray here.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mocolab.config import (
    Config,
    ConfigError,
    build_config,
    format_validation_error,
    parse_override,
    read_yaml,
    set_dotted,
)

SEED_KEY = "train.seed"
RUN_NAME_KEY = "tracking.run_name"
EVALS = ("lincls", "detection")
MAX_CHECKED_COMBINATIONS = 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSWEEPABLE = ("tracking.", "scaling.storage_path")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Axis(_Strict):
    """One entry of ``space:``: exactly one of grid, choice, uniform, loguniform."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Axis:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        if self.values is not None and not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        lo_hi = self.uniform or self.loguniform
        if lo_hi is not None:
            lo, hi = lo_hi
            if not lo < hi:
                raise ValueError(f"{self.kind}: [lo, hi] needs lo < hi (got [{lo}, {hi}])")
            if self.loguniform is not None and lo <= 0:
                raise ValueError(f"loguniform: bounds must be > 0 (got [{lo}, {hi}])")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any] | None:
        """The listed values of a grid or choice axis; None for a continuous one."""
        return self.grid if self.grid is not None else self.choice

    @property
    def values_to_check(self) -> list[Any]:
        """Values that cover the axis when validating: every listed value, or both bounds."""
        return list(self.values) if self.values is not None else list(self.uniform or self.loguniform)


class SchedulerSpec(_Strict):
    """``scheduler: none`` or ``scheduler: {type: asha, grace_period: 2, reduction_factor: 3}``."""

    type: Literal["none", "asha"] = "none"
    metric: Literal["knn_top1"] = "knn_top1"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(4, gt=1)


class Resources(_Strict):
    """Per trial: Ray Train workers and what each holds (``scaling.*`` of every trial)."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: Literal[0, 1] = 0


class SweepSpec(_Strict):
    """A sweep file (see experiments/sweeps/)."""

    name: str
    base: dict[str, Any] = Field(default_factory=dict, description="run config: {config: PATH, ...inline overrides}")
    space: dict[str, Axis] = Field(default_factory=dict)
    seeds: list[int] | None = Field(None, description="repeats over train.seed; default: the base config's seed")
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: samples")
    search_seed: int = Field(0, description="random state of the random search")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent_trials: int = Field(1, ge=1)
    evals: list[Literal["lincls", "detection"]] | None = Field(
        None, description="evaluations after each trial; default: those configured in the base's eval section"
    )
    max_failures: int = Field(0, ge=0, description="retries of a failed trial")

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name={v!r}: use letters, digits, '.', '_' and '-' (it names runs and folders)")
        return v

    @field_validator("base", mode="before")
    @classmethod
    def _base_path_shorthand(cls, v: Any) -> Any:
        return {"config": v} if isinstance(v, str) else v

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @field_validator("space")
    @classmethod
    def _space_keys(cls, space: dict[str, Axis]) -> dict[str, Axis]:
        seen: set[str] = set()
        for key, axis in space.items():
            keys = axis_keys(key)
            for k in keys:
                if k == SEED_KEY:
                    raise ValueError(f"space.{k}: repeat seeds with the top-level 'seeds:' list instead")
                if k.startswith(_UNSWEEPABLE):
                    raise ValueError(f"space.{k}: the sweep sets tracking and storage for every trial; remove it")
                if k in seen:
                    raise ValueError(f"space: key {k} appears in more than one axis")
                seen.add(k)
            if len(keys) > 1:
                if axis.values is None:
                    raise ValueError(f"space.'{key}': zipped keys need grid or choice lists of {len(keys)}-lists")
                for value in axis.values:
                    if not isinstance(value, list) or len(value) != len(keys):
                        raise ValueError(f"space.'{key}': value {value!r} is not a list of {len(keys)} values")
        return space

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepSpec:
        continuous = [k for k, a in self.space.items() if a.values is None]
        if self.search == "grid" and continuous:
            raise ValueError(f"search: grid cannot enumerate {continuous} (uniform/loguniform); use search: random")
        if self.search == "optuna":
            if importlib.util.find_spec("optuna") is None:
                raise ValueError("search: optuna needs the optuna package (pip install optuna); or use search: random")
            grids = [k for k, a in self.space.items() if a.grid is not None]
            if grids or len(self.seeds or []) > 1:
                raise ValueError(
                    f"search: optuna samples every axis: use choice instead of grid for {grids} and one seed"
                )
        if self.evals is not None and len(set(self.evals)) != len(self.evals):
            raise ValueError(f"evals={self.evals} lists an evaluation twice")
        return self

    @property
    def axes(self) -> list[str]:
        """The swept dotted keys, in file order (zipped axes flattened)."""
        return [k for key in self.space for k in axis_keys(key)]


def axis_keys(key: str) -> list[str]:
    """``"moco.mechanism, train.batch_size"`` -> ``["moco.mechanism", "train.batch_size"]``."""
    return [k.strip() for k in key.split(",") if k.strip()]


def assignment_of(axis_key: str, value: Any) -> dict[str, Any]:
    """The dotted keys one axis value sets (a zipped axis sets several)."""
    keys = axis_keys(axis_key)
    return dict(zip(keys, value)) if len(keys) > 1 else {keys[0]: value}


def _deep_merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        elif "." in key:
            set_dotted(into, key, value)
        else:
            into[key] = value
    return into


def base_raw(spec: SweepSpec, sweep_dir: Path, overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The raw base run config: ``base.config`` (relative to the sweep file) + inline overrides + ``--set``."""
    inline = dict(spec.base)
    raw: dict[str, Any] = {}
    config_path = inline.pop("config", None)
    if config_path is not None:
        path = Path(config_path)
        try:
            raw = read_yaml(path if path.is_absolute() else sweep_dir / path)
        except ConfigError as err:
            raise ConfigError(f"base.config={config_path} (relative to {sweep_dir}): {err}") from None
    _deep_merge(raw, inline)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def trial_raw(spec: SweepSpec, base: dict[str, Any], assignment: dict[str, Any], run_name: str) -> dict[str, Any]:
    """The raw run config of one trial: base + resources + evals + the trial's values + run name.

    With one worker and ``model.bn=shuffle`` (not swept), the trial uses ``model.bn=split``:
    shuffle-BN needs several workers and SplitBatchNorm emulates it on one."""
    raw = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    set_dotted(raw, "scaling.num_workers", spec.resources.workers)
    set_dotted(raw, "scaling.cpus_per_worker", spec.resources.cpus_per_worker)
    set_dotted(raw, "scaling.use_gpu", spec.resources.gpus_per_worker > 0)
    if spec.evals is not None:
        evals = raw.setdefault("eval", {})
        for name in EVALS:
            if name in spec.evals:
                evals[name] = evals.get(name) or {}
            else:
                evals.pop(name, None)
    for key, value in assignment.items():
        set_dotted(raw, key, value)
    workers = raw["scaling"]["num_workers"]
    bn = (raw.get("model") or {}).get("bn", "shuffle")
    if workers == 1 and bn == "shuffle" and "model.bn" not in spec.axes:
        set_dotted(raw, "model.bn", "split")
    set_dotted(raw, RUN_NAME_KEY, run_name)
    return raw


def trial_config(
    spec: SweepSpec, base: dict[str, Any], assignment: dict[str, Any], run_name: str, cwd: Path | None = None
) -> Config:
    """The validated run config of one trial (ConfigError naming the trial's values if invalid).

    Relative paths resolve against ``cwd`` (default: the current directory): trials pass the sweep
    driver's, since Ray Tune runs each trial in its own directory."""
    try:
        return build_config(trial_raw(spec, base, assignment, run_name), base=cwd)
    except ConfigError as err:
        values = ", ".join(f"{k}={v!r}" for k, v in assignment.items()) or "the base config"
        raise ConfigError(f"sweep '{spec.name}': the trial with {values} is invalid: {err}") from None


def _checked_assignments(spec: SweepSpec) -> list[dict[str, Any]]:
    """Assignments covering every listed value and both bounds of continuous axes, with every seed:
    the full product when small enough, else each axis value once (over the first value of the others)."""
    seeds = spec.seeds or [None]
    columns = [[(key, v) for v in axis.values_to_check] for key, axis in spec.space.items()]
    columns.append([(SEED_KEY, s) for s in seeds])
    size = 1
    for col in columns:
        size *= len(col)
    if size <= MAX_CHECKED_COMBINATIONS:
        combos = list(itertools.product(*columns))
    else:
        first = [col[0] for col in columns]
        combos = [tuple(first[:i] + [item] + first[i + 1 :]) for i, col in enumerate(columns) for item in col]
    out = []
    for combo in combos:
        assignment: dict[str, Any] = {}
        for key, value in combo:
            if key == SEED_KEY:
                if value is not None:
                    assignment[SEED_KEY] = value
            else:
                assignment.update(assignment_of(key, value))
        out.append(assignment)
    return out


def validate_trials(spec: SweepSpec, base: dict[str, Any]) -> list[Config]:
    """Build every trial config the sweep can produce (see ``_checked_assignments``) with the schema's rules;
    return them (the first is the first trial's). The checks that need files or data run in the pre-flight
    step over the returned configs (``mocolab sweep`` does it before Ray starts).

    Raises ConfigError naming the key and value of the first invalid trial."""
    checked = [
        trial_config(spec, base, assignment, run_name=f"{spec.name}-check-{i}")
        for i, assignment in enumerate(_checked_assignments(spec))
    ]
    first = checked[0]
    if spec.scheduler.type == "asha" and first.train.knn_every != 1:
        raise ConfigError(
            f"sweep '{spec.name}': scheduler asha compares knn_top1 every epoch; "
            f"set train.knn_every=1 in the base (got {first.train.knn_every})"
        )
    if spec.search == "optuna" and first.train.knn_every == 0:
        raise ConfigError(f"sweep '{spec.name}': search optuna maximises knn_top1; set train.knn_every >= 1")
    if (spec.scheduler.type == "asha" or spec.search == "optuna") and first.knn_data is None:
        raise ConfigError(
            f"sweep '{spec.name}': its scheduler or search needs knn_top1, but data.dataset={first.data.dataset} has "
            "no labels for the kNN monitor; set train.knn_dataset to a labeled data section"
        )
    return checked


def parse_sweep(raw: dict[str, Any], source: str = "sweep file") -> SweepSpec:
    """Validate the sweep file's own structure (not yet the trial configs)."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        message = format_validation_error(err).replace("invalid config:", f"invalid {source}:", 1)
        raise ConfigError(message) from None


def load_sweep(
    path: str | Path, overrides: tuple[str, ...] | list[str] = (), name: str | None = None
) -> tuple[SweepSpec, dict[str, Any], list[Config]]:
    """Read and validate a sweep file: ``(spec, raw base config, the checked trial Configs)``, the first of
    which is the first trial's.

    ``overrides`` (``--set KEY=VALUE``) apply to the base config of every trial; ``name`` replaces
    the sweep's name. Every trial config is validated here, before anything runs. The tracking URI
    and storage path are fixed, absolute, in the returned base (trials run where the cwd and the
    environment differ)."""
    path = Path(path).resolve()
    raw = read_yaml(path)
    if name is not None:
        raw["name"] = name
    spec = parse_sweep(raw, source=f"sweep file {path}")
    base, checked = prepare_sweep(spec, path.parent, overrides)
    return spec, base, checked


def prepare_sweep(
    spec: SweepSpec, sweep_dir: Path, overrides: tuple[str, ...] | list[str] = ()
) -> tuple[dict[str, Any], list[Config]]:
    """The raw base config of a parsed sweep (``base.config`` relative to ``sweep_dir``, then ``overrides``)
    and its checked trial Configs (the first is the first trial's), with the tracking URI and storage path
    made absolute in the base."""
    base = base_raw(spec, sweep_dir, overrides)
    checked = validate_trials(spec, base)
    first = checked[0]
    set_dotted(base, "tracking.tracking_uri", first.tracking.tracking_uri)
    storage = first.scaling.storage_path
    if "://" not in storage:  # the schema's default is relative; Tune needs it absolute
        storage = str(Path(storage).resolve())
        set_dotted(base, "scaling.storage_path", storage)
        for cfg in checked:
            cfg.scaling.storage_path = storage
    return base, checked
