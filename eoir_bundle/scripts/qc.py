"""``python -m scripts.qc``: a QC picture of one registered pair (the code is :mod:`scripts.evaluation.qc`)."""

from .evaluation.qc import main

if __name__ == "__main__":
    main()
