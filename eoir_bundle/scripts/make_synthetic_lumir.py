"""``python -m scripts.make_synthetic_lumir``: a synthetic LUMIR-layout data set from the MNI152 template (the code is :mod:`scripts.synthetic.lumir`)."""

from .synthetic.lumir import main

if __name__ == "__main__":
    main()
