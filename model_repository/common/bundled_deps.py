"""Put a python model's bundled wheels (`deps/` beside its model.py) first on sys.path.

Written by `clip-triton repository` (exporter/base/python_deps.py, docs/deploy.md): the folder holds
Pillow / the tokenizer libraries / onnxruntime built for one Python X.Y, so a stock Triton
container serves the repository with nothing installed at start. Compiled wheels for another
Python would fail later with an obscure ImportError; refuse at load, in one line, instead.
Without a `deps/` folder (a repository written with --no-python-deps) nothing changes.

The embedded server of `clip-triton serve` / `parity` (CLIP_TRITON_EMBEDDED_SERVER=1) runs the
repository on this machine's Python, which need not be the container's: there, wheels for
another Python are skipped and the serving environment's own packages are used.
"""

import json
import os
import sys


def use_bundled_deps(model_dir):
    deps = os.path.join(model_dir, "deps")
    record = os.path.join(deps, "DEPS.json")
    if not os.path.isfile(record):
        return None
    with open(record) as fh:
        info = json.load(fh)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if info.get("python") != running:
        if os.environ.get("CLIP_TRITON_EMBEDDED_SERVER") == "1":
            return None
        raise RuntimeError(
            f"this model's bundled wheels ({deps}) are for Python {info.get('python')}, but this Triton's "
            f"python backend runs Python {running}: write the repository again with the --triton-release "
            "of this container (or --deps-python " + running + ")"
        )
    if deps not in sys.path:
        sys.path.insert(0, deps)
    return info
