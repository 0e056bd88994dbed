"""Loading: YAML files, ``--set`` overrides, paths made absolute, one line per validation problem."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mocolab.config.base import ConfigError, set_dotted
from mocolab.config.schema import Config


def parse_override(text: str) -> tuple[str, Any]:
    """``"moco.temperature=0.2"`` -> ``("moco.temperature", 0.2)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set moco.temperature=0.2")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def new_run_name(prefix: str = "moco") -> str:
    """A fresh unique run name: ``moco-20261127-193000-a1b2``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """Make a relative ``sqlite:///x.db`` absolute against ``base``; other URIs are returned unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def _absolute(path: Any, base: Path) -> Any:
    if path in (None, ""):
        return path
    text = str(path)
    if "://" in text:  # a URI stays exactly as given (file:// included)
        return text
    p = Path(os.path.expanduser(text))
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the config's paths absolute against ``base`` (in place, on the raw dict)."""
    model = raw.get("model") or {}
    if isinstance(model, dict) and "init_weights" in model:
        model["init_weights"] = _absolute(model["init_weights"], base)
    data = raw.get("data") or {}
    if isinstance(data, dict) and "root" in data:
        data["root"] = _absolute(data["root"], base)
    knn = (raw.get("train") or {}).get("knn_dataset") if isinstance(raw.get("train"), dict) else None
    if isinstance(knn, dict) and "root" in knn:
        knn["root"] = _absolute(knn["root"], base)
    scaling = raw.get("scaling") or {}
    if isinstance(scaling, dict) and "storage_path" in scaling:
        scaling["storage_path"] = _absolute(scaling["storage_path"], base)
    ev = raw.get("eval") or {}
    if isinstance(ev, dict):
        lin = ev.get("lincls") or {}
        if isinstance(lin, dict) and isinstance(lin.get("dataset"), dict) and "root" in lin["dataset"]:
            lin["dataset"]["root"] = _absolute(lin["dataset"]["root"], base)
        det = ev.get("detection") or {}
        if isinstance(det, dict) and isinstance(det.get("data"), dict):
            for key in ("root", "train_json", "val_json"):
                if key in det["data"]:
                    det["data"][key] = _absolute(det["data"][key], base)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``moco.temperature: ... (fix)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key '{loc}'; remove it or check its spelling against experiments/ and the README"
        elif e["type"] == "list_type" and isinstance(e.get("input"), dict):  # --set a.list.0=x made a section
            msg = f"{loc} is a list: set it whole, e.g. --set '{loc}=[...]' (got {e['input']!r})"
        elif e["type"] == "literal_error":
            msg = f"{loc}: {msg} (got {e.get('input')!r})"
        elif loc and not msg.startswith(loc.split(".")[-1]) and loc not in msg:
            msg = f"{loc}: {msg} (got {e.get('input')!r})"
        lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(raw: dict[str, Any], base: Path | None = None) -> Config:
    """Validate a raw dict into a Config: paths absolute against ``base`` (default: cwd),
    a fresh run name if none is given, the tracking URI resolved. Raises ConfigError."""
    base = Path.cwd() if base is None else base
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy with plain types
    _resolve_paths(raw, base)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    if not cfg.tracking.run_name:
        cfg.tracking.run_name = new_run_name()
    cfg.tracking.tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri or default_tracking_uri(), base)
    cfg.scaling.storage_path = _absolute(cfg.scaling.storage_path, base)  # also the default "ray_results"
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError naming the file if it cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file (e.g. experiments/pretrain/*.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}); check its permissions") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (moco:, model:, data:, ...)")
    return raw


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Load a YAML config (or the defaults), apply ``--set KEY=VALUE`` overrides, validate.

    Relative paths in the file and in overrides resolve against the current directory."""
    raw = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return build_config(raw)
