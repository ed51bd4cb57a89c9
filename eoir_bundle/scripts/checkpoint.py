"""Loading EOIR weights with checks: a checkpoint that does not fit ``network_def`` gets one
clear message (which file, which keys, what ``start_channel`` it was made for).

A bundle checkpoint is a plain ``state_dict`` of :class:`scripts.network.EOIR`; the training
workflow's checkpoints (``{"model": state_dict, "optimizer": ..., ...}``) are accepted too.
:func:`load_torchscript` loads the TorchScript export (``models/model.ts``, made by
``python -m monai.bundle ckpt_export``) instead, for ``configs/inference_ts.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.handlers import CheckpointLoader

from .errors import InputError

ENCODER_FIRST_WEIGHT = "encoder.0.conv.weight"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` a checkpoint file on the CPU, with a clear error if it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: checkpoint file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{p}: cannot read checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{p}: checkpoint is a {type(obj).__name__}, expected a state dict")
    return obj


def model_state(ckpt: dict, key: str = "model") -> dict:
    """The network's state dict inside a checkpoint: ``ckpt[key]`` if present, else ``ckpt`` itself."""
    inner = ckpt.get(key)
    return inner if isinstance(inner, dict) else ckpt


def start_channel_of(state: dict) -> int | None:
    """``start_channel`` a bundle state dict was made for (output channels of the first conv)."""
    w = state.get(ENCODER_FIRST_WEIGHT)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 5 else None


def check_state_dict(state: dict, network: torch.nn.Module, source: str | os.PathLike) -> None:
    """Raise :class:`InputError` unless ``state`` has exactly the keys and shapes of ``network``."""
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} keys of another shape (e.g. {k}: {got[k]} in the file, {expected[k]} expected)")
    msg = f"{source}: checkpoint does not match network_def: " + "; ".join(parts)
    n_file = start_channel_of(state)
    n_net = getattr(getattr(network, "net", network), "start_channel", None)  # a wrapper (LeanEOIR) or EOIR
    if n_file is not None and n_net is not None and n_file != n_net:
        msg += f". It was made for start_channel={n_file}: run with --network_def#start_channel {n_file}"
    elif any(k.startswith(("simple_encoder.", "disp_warp_")) for k in unexpected):
        msg += ". It is in the authors' layout: convert it first with python -m scripts.convert_checkpoint"
    raise InputError(msg)


def load_weights(network: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a checked bundle checkpoint into ``network`` (strict) and return it."""
    state = model_state(read_checkpoint(path))
    check_state_dict(state, network, path)
    network.load_state_dict(state, strict=True)
    return network


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for one network, checking the file before loading it.

    ``CheckpointLoader`` itself fails with torch's multi-line ``load_state_dict`` error; this
    one names the file and the mismatch (and the ``start_channel`` the file was made for).
    Plain state dicts and ``{"model": ...}`` training checkpoints both load.
    """

    def __init__(self, load_path: str, network: torch.nn.Module, name: str | None = None, map_location=None):
        super().__init__(load_path=load_path, load_dict={"model": network}, name=name, map_location=map_location, strict=True)
        self.network = network

    def __call__(self, engine) -> None:
        check_state_dict(model_state(read_checkpoint(self.load_path)), self.network, self.load_path)
        super().__call__(engine)


def load_torchscript(path: str | os.PathLike, map_location=None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` an exported network (``models/model.ts``) in eval mode, with one clear
    error if the file is missing or is not a TorchScript export of :class:`scripts.network.EOIR`.

    The module computes what ``network_def`` computes (the same ``forward``, weights baked in),
    so ``configs/inference_ts.json`` uses it in place of ``network_def`` + ``models/model.pt``.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: TorchScript file not found (make it with python -m monai.bundle ckpt_export "
                         "network_def --filepath models/model.ts --ckpt_file models/model.pt "
                         "--meta_file configs/metadata.json --config_file configs/inference.json)")
    try:
        module = torch.jit.load(str(p), map_location=map_location)
    except Exception as e:
        raise InputError(f"{p}: cannot load as TorchScript ({e.__class__.__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]})") from None
    if ENCODER_FIRST_WEIGHT not in module.state_dict():
        raise InputError(f"{p}: not a TorchScript export of the EOIR network (no {ENCODER_FIRST_WEIGHT})")
    return module.eval()
