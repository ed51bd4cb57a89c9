#!/usr/bin/env bash
# Add MONAI Label to the bundle's environment (the `python` on PATH), after
# `pip install -r requirements.txt` at the repository root; the root file's pins are kept.
#   bash eoir_bundle/monailabel_app/install.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root_requirements="$here/../../requirements.txt"
if [ ! -f "$root_requirements" ]; then
    echo "install.sh: $root_requirements not found; run the install.sh of the repository's eoir_bundle/monailabel_app" >&2
    exit 1
fi
python -m pip install --quiet -r "$here/requirements.txt" -c "$root_requirements"
python -m pip install --quiet --no-deps -r "$here/requirements-nodeps.txt"

# the server's imports resolve, and the bundle's pins are unchanged
python - "$root_requirements" <<'PY'
import contextlib, io, re, sys
from importlib.metadata import version

with contextlib.redirect_stdout(io.StringIO()):
    import monailabel.app  # noqa: F401 - everything `monailabel start_server` imports

pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(sys.argv[1]).read(), re.M))
for name in ("torch", "monai", "numpy", "jsonschema"):
    have = version(name)
    if have.split("+")[0] != pins[name]:
        sys.exit(f"install.sh: {name} {have} installed, requirements.txt pins {pins[name]}")
print("monailabel", version("monailabel"), "|", ", ".join(f"{n} {version(n)}" for n in ("torch", "monai", "numpy", "jsonschema")))
PY
monailabel --help > /dev/null
echo "monailabel installed: monailabel start_server --app ... (eoir_bundle/monailabel_app/README.md)"
