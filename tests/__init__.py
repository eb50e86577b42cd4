"""The test suite. Under pytest-xdist (`make test` runs two workers) each worker gets its own cache of the dynamic
modules transformers copies out of checkpoints with `trust_remote_code`: two workers loading converted folders of
the same name would otherwise rewrite the same cached `modeling_mfa.py` while the other imports it. Set here,
before anything imports transformers, which reads the variable once."""

import os
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:
    default = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "modules"
    os.environ["HF_MODULES_CACHE"] = (
        f"{os.environ.get('HF_MODULES_CACHE', default)}-{os.environ['PYTEST_XDIST_WORKER']}"
    )
