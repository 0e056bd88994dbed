"""Reading a weights file safely: what it holds is data, never code.

``torch.save`` files (zip or legacy format) are read with ``torch.load(weights_only=True)``; any other
pickle (detectron2's ``.pkl``) only through an unpickler that knows numpy arrays and nothing else. A file that
asks for anything else (a pickled object whose loading would call ``os.system``, say) is refused as
not a weights-only checkpoint, and never loaded unsafely; a file that is neither format (text, YAML,
an empty or truncated file) is refused as not a PyTorch checkpoint. Errors are ConfigError naming
``where`` (the option or config field and the file).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocolab.config import ConfigError
from mocolab.weights_io.layouts import BackboneWeights, UnknownLayoutError, find_layout

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
TORCH_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # _use_new_zipfile_serialization=False
PICKLE_PROTO = pickle.PROTO[0]
PICKLE_PROTOCOLS = range(2, 6)
NUMPY_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),  # pickles written with numpy 1.x
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a Python object outside the allowed set; ``name`` is ``module.qualname``."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NUMPY_GLOBALS:
            raise UnsafePickleError(f"{module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _numpy_to_torch(obj: Any) -> Any:
    """numpy arrays in (nested) dicts -> tensors."""
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    return torch.from_numpy(np.array(obj)) if isinstance(obj, np.ndarray) else obj


def _refused_object(torch_message: str) -> str:
    """The global torch's weights-only unpickler refused, from its message (or a general phrase)."""
    found = re.search(r"GLOBAL (\S+)", torch_message)
    return f"the Python object {found[1]}" if found else "Python objects"


def not_weights_only(where: str, refused: str) -> ConfigError:
    return ConfigError(
        f"{where} is not a weights-only checkpoint: it holds {refused}, beyond the tensors, numbers, strings, "
        "lists and dicts that torch.load(weights_only=True) accepts. mocolab will not load it unsafely "
        "(unpickling such objects can run code from the file); give a file of tensors, e.g. one written by "
        "torch.save(model.state_dict(), PATH)"
    )


def _load_plain_pickle(file: Path, where: str) -> Any:
    """A pickle of dicts, lists, numbers, strings and numpy arrays (detectron2's .pkl), arrays as tensors."""
    with open(file, "rb") as f:
        try:
            obj = _NumpyUnpickler(f).load()
        except UnsafePickleError as err:
            raise not_weights_only(where, f"the Python object {err.name}") from None
        except Exception as err:  # a damaged pickle: any of pickle's, struct's or numpy's errors
            raise ConfigError(
                f"{where} is not a readable pickle ({type(err).__name__}: {err}); is it complete?"
            ) from None
    return _numpy_to_torch(obj)


def read_weights_file(path: Path | str, where: str) -> Any:
    """The content of a weights file, loaded without running code from it (see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{where}: no such file")
    with open(file, "rb") as f:
        head = f.read(len(TORCH_LEGACY_MAGIC))
    if not head.startswith((ZIP_MAGIC, TORCH_LEGACY_MAGIC)):
        if len(head) >= 2 and head[0] == PICKLE_PROTO and head[1] in PICKLE_PROTOCOLS:
            return _load_plain_pickle(file, where)
        raise ConfigError(
            f"{where} is not a PyTorch checkpoint: it is neither torch.save's format nor a pickle (starts with "
            f"{head!r}); give a weights file written by torch.save"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise not_weights_only(where, _refused_object(str(err))) from None
    except Exception as err:  # torch reports damaged files with RuntimeError, EOFError, KeyError, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{where} is not a readable PyTorch checkpoint ({first_line}); is it complete?") from None


def backbone_weights(obj: Any, where: str) -> BackboneWeights:
    """The backbone in a loaded checkpoint (:func:`layouts.find_layout`); ConfigError naming ``where``."""
    try:
        return find_layout(obj)
    except UnknownLayoutError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_backbone_weights(path: Path | str, where: str) -> BackboneWeights:
    """Read ``path`` safely and find the backbone in it, whatever program wrote it (see layouts.LAYOUTS)."""
    return backbone_weights(read_weights_file(path, where), where)
