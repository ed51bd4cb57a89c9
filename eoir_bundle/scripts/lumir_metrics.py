"""``python -m scripts.lumir_metrics``: the LUMIR challenge's metrics on a folder of disp files (the code is :mod:`scripts.evaluation.lumir`)."""

from .evaluation.lumir import main

if __name__ == "__main__":
    main()
