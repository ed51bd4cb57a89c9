"""EOIR bundle code, imported by the bundle configs (``"_target_": "scripts..."``); commands run
from the bundle folder as ``python -m scripts.<tool>``.

Layers, lowest first; a module imports only its own layer and those below it (checked by
``tests/test_layout.py``):

- foundation: ``errors`` (user-facing errors), ``file_io`` (atomic NIfTI/ITK I/O, disp files),
  ``geometry`` (affines, grids, the network grid transform), ``threads`` (CPU threads from the
  cores other processes leave free; the engine handler of the configs' ``num_threads``);
- model: ``layers`` (MONAI warp/integration layers TorchScript compiles, pad-to-16),
  ``inverse`` (inverse fields: reverse composition of velocities, fixed-point iteration),
  ``network`` (EOIR), ``losses``, ``checkpoint``;
- components: ``lean/`` (the memory-lean CPU inference path), ``data/`` (data lists, the
  random-pair training set), ``evaluation/`` (metrics, the LUMIR evaluator, QC figures, the
  metric handler), ``transforms`` (input checks), ``mni`` (the MNI152 template on LUMIR's
  grid), ``preprocessing/`` (raw scans to LUMIR-like MNI images: N4, affine to MNI, brain
  extraction, intensities; the ``preprocess`` step of inference);
- runtime: ``instance_optimization``, ``disp_writer``, ``training`` (trainer glue), and the
  user tools ``warp`` and ``convert_checkpoint``;
- generators: ``synthetic/`` (LUMIR-layout data from the MNI152 template or a real subject);
- tools: ``tools/`` (benchmarks, profiler, method comparison, plots; developer tools);
- entry points: ``qc``, ``lumir_metrics``, ``make_synthetic_lumir``, ``compare_methods``,
  ``benchmark`` (the command names users know, kept as thin modules).
"""

from .errors import install_excepthook

install_excepthook()
