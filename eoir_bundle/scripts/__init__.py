"""EOIR bundle code: the network, data lists, transforms, handlers and command-line tools.

Imported by the bundle configs (``"_target_": "scripts..."``); commands run from the bundle
folder as ``python -m scripts.<tool>``.
"""

from .errors import install_excepthook

install_excepthook()
