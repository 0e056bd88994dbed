"""What the pre-flight checks counted and noted, and the error they raise."""

from __future__ import annotations

from dataclasses import dataclass, field

from mocolab.config import Config, ConfigError


@dataclass
class PreflightReport:
    """What the checks counted, per distinct data section: training and test images."""

    train_images: dict[str, int] = field(default_factory=dict)
    test_images: dict[str, int] = field(default_factory=dict)
    detection: list[str] = field(default_factory=list)  # "N train / M val images, classes [...]"
    init_weights: dict[str, str] = field(default_factory=dict)  # model.init_weights file -> its layout summary
    checked: set[str] = field(default_factory=set)  # evaluation data sections already checked
    notes: list[str] = field(default_factory=list)  # things the user should know once, e.g. the kNN monitor is off

    def summary(self) -> str:
        parts = [f"{n:,} training images" for n in self.train_images.values()]
        parts += [f"detection: {text}" for text in self.detection]
        parts += [f"model.init_weights {layout}" for layout in self.init_weights.values()]
        lines = [f"[mocolab] pre-flight checks passed ({'; '.join(parts) or 'data, storage, tracking'})"]
        return "\n".join(lines + [f"[mocolab] {note}" for note in self.notes])


def user_error(where: str, err: Exception) -> ConfigError:
    text = str(err)
    return ConfigError(text if where in text else f"{where}: {text}")


def data_key(cfg: Config) -> str:
    return cfg.data.model_dump_json()
