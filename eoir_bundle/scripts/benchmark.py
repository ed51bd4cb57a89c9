"""``python -m scripts.benchmark``: CPU/GPU inference speed and memory per inference path (the code is :mod:`scripts.tools.benchmark`)."""

from .tools.benchmark import main

if __name__ == "__main__":
    main()
