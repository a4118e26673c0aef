"""Load a script under tools/ as a module (the tools are scripts, not a package)."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_tool(relpath: str, name: str) -> ModuleType:
    """Execute ``ROOT / relpath`` as a fresh module called ``name`` and return it."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
