"""Raw T1w scans to LUMIR-like images in MNI space, for inference (``preprocess`` in
``configs/inference.json``; the model-card text is ``docs/preprocessing.md``).

- ``assess``: the ``"auto"`` rule (brain-extracted? MNI-aligned?);
- ``intensity``: any dtype and scale onto LUMIR's 0..255;
- ``morphology``: masks in millimetres;
- ``mni_affine``: the native brain estimate and the two-stage brain-to-brain affine registration
  to MNI152 (antspyx), shared with :mod:`scripts.synthetic.subject_pairs`;
- ``pipeline``: one scan end to end, with the checks that stop a bad scan;
- ``transform``: ``Preprocessd`` (the pipeline step) and ``native_field`` (the hook that composes
  the network's field with both affines onto the native fixed grid for the disp writer).
"""
