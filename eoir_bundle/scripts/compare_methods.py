"""``python -m scripts.compare_methods``: the network, instance optimisation and ANTs SyN side by side on labelled pairs (the code is :mod:`scripts.tools.compare_methods`)."""

from .tools.compare_methods import main

if __name__ == "__main__":
    main()
