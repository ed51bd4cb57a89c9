"""Memory-lean, fast CPU inference for :class:`scripts.network.EOIR`.

``lean_forward(net, x)`` returns what ``net.eval()(x)`` returns (the full-resolution ``ddf``,
same conventions, same parameters; the only weight copies are kB-sized re-layouts) without
ever holding a full-resolution map wider than the ``N``-channel encoder features, and on
images with an exactly-zero background (skull-stripped brains) it skips the encoder's work
on the background. Every step is the same arithmetic as ``EOIR.forward`` up to the order of
float rounding; the fields agree to about 1e-5 voxel. :class:`LeanEOIR` wraps an ``EOIR`` so
that its inference runs this path (the bundle's ``inference.json``:
``scripts.lean.LeanEOIR``).

Modules, from the building blocks up (each imports only the ones before it):

* :mod:`.memory`: reused buffers, the channels-last layout, giving memory back to the OS;
* :mod:`.covers`: background skipping (keep masks, covers of tiles, background planes);
* :mod:`.streams`: 3x3x3 convolutions streamed by rows;
* :mod:`.moments`: InstanceNorm from per-chunk moments, norm + PReLU;
* :mod:`.maps`: stored feature maps, dense or ragged;
* :mod:`.encoder`: the encoder without its ``2N``-channel map (:func:`encode`);
* :mod:`.fixed`: the fixed image's features, and their reuse across pairs sharing it;
* :mod:`.resampling`: warping, integration and trilinear resizing by rows;
* :mod:`.estimator`: a level's flow estimator streamed by rows;
* :mod:`.forward`: the whole network, :func:`lean_forward`, :class:`LeanEOIR`.

What was measured and tried: ``NOTES.md`` next to these modules.
"""

from .encoder import encode
from .fixed import FixedFeatureCache
from .forward import LeanEOIR, default_store_limit, lean_forward

__all__ = ["lean_forward", "LeanEOIR", "encode", "default_store_limit", "FixedFeatureCache"]
