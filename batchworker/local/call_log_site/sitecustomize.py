"""Loaded by Python at start-up in processes the local cloud gives BATCHWORKER_CALL_LOG: record AWS calls.

Loads call_log.py by path (next to this folder), so it works whichever `batchworker` the process imports.
"""

import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "call_log.py")
_spec = importlib.util.spec_from_file_location("batchworker_call_log", _path)
if _spec is not None and _spec.loader is not None and os.environ.get("BATCHWORKER_CALL_LOG"):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.install_from_env()
