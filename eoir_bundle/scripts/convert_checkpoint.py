"""Convert the EOIR authors' checkpoint into a plain state dict of :class:`scripts.network.EOIR`.

Usage (from the bundle folder)::

    python -m scripts.convert_checkpoint SRC DST

``SRC`` is the authors' ``torch.save`` file (a dict with ``model_state_dict``, or a bare
state dict), with or without their identity-grid buffers (``transformers.*.grid``,
``integrates.*.transformer.grid``: ~180 MB that carry no information and are dropped).
``start_channel`` is inferred, every key and shape is checked against a freshly built
network, and ``DST`` is written atomically. Key mapping (authors -> bundle)::

    simple_encoder.K.layer.0.*          -> encoder.K.conv.*
    simple_encoder.K.layer.2.weight     -> encoder.K.adn.A.weight      (PReLU slope)
    disp_warp_L.disp_field_fea.0.*      -> estimators.L.features.0.conv.*
    disp_warp_L.disp_field_fea.2.*      -> estimators.L.features.1.conv.*
    disp_warp_L.get_flow.*              -> estimators.L.flow.conv.*
"""

from __future__ import annotations

import argparse
import re

from .checkpoint import check_state_dict, read_checkpoint
from .errors import InputError, exit_on_input_error
from .file_io import atomic_torch_save
from .network import EOIR

_RULES = [
    (re.compile(r"^simple_encoder\.(\d)\.layer\.0\.(weight|bias)$"), r"encoder.\1.conv.\2"),
    (re.compile(r"^simple_encoder\.(\d)\.layer\.2\.weight$"), r"encoder.\1.adn.A.weight"),
    (re.compile(r"^disp_warp_(\d)\.disp_field_fea\.0\.(weight|bias)$"), r"estimators.\1.features.0.conv.\2"),
    (re.compile(r"^disp_warp_(\d)\.disp_field_fea\.2\.(weight|bias)$"), r"estimators.\1.features.1.conv.\2"),
    (re.compile(r"^disp_warp_(\d)\.get_flow\.(weight|bias)$"), r"estimators.\1.flow.conv.\2"),
]
GRID_BUFFER_KEY = re.compile(r"^(transformers\.\d+\.grid|integrates\.\d+\.transformer\.grid)$")


def bundle_key(authors_key: str) -> str | None:
    """The bundle's name of one of the authors' parameters (``None``: a key outside their layout)."""
    for pattern, repl in _RULES:
        if pattern.match(authors_key):
            return pattern.sub(repl, authors_key)
    return None


def convert_state_dict(authors: dict, source: str = "checkpoint") -> tuple[dict, int]:
    """Map the authors' state dict to the bundle's; return ``(state_dict, start_channel)``."""
    state = authors.get("model_state_dict", authors)
    if not isinstance(state, dict) or not state:
        raise InputError(f"{source}: no model_state_dict and no tensors found")
    out, unknown = {}, []
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key  # saved from DataParallel
        if GRID_BUFFER_KEY.match(key):
            continue
        target = bundle_key(key)
        if target is None:
            unknown.append(key)
        else:
            out[target] = value.detach().clone().float().contiguous()
    if unknown:
        raise InputError(f"{source}: {len(unknown)} keys are not in the EOIR layout (e.g. {unknown[0]})")
    first = out.get("encoder.0.conv.weight")
    if first is None or first.ndim != 5:
        raise InputError(f"{source}: simple_encoder.0.layer.0.weight is missing: not an EOIR checkpoint")
    start_channel = int(first.shape[0])
    check_state_dict(out, EOIR(start_channel=start_channel), source)
    return out, start_channel


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the authors' checkpoint (.pth / .pth.tar)")
    parser.add_argument("dst", help="where to write the bundle state dict, e.g. models/model_authors.pt")
    args = parser.parse_args(argv)
    state, n = convert_state_dict(read_checkpoint(args.src), source=args.src)
    try:
        atomic_torch_save(state, args.dst)
    except OSError as e:
        raise InputError(f"{args.dst}: cannot write ({e.strerror or e})") from None
    n_params = sum(v.numel() for v in state.values())
    print(f"wrote {args.dst}: start_channel={n}, {len(state)} tensors, {n_params:,} parameters")
    print(f"use it with: --ckpt_path {args.dst} --network_def#start_channel {n}")


if __name__ == "__main__":
    main()
