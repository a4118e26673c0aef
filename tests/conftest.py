"""Test-session settings (loaded by pytest before any test module imports torch)."""
import os
import sys
from pathlib import Path

# OpenMP threads spinning at barriers stall every parallel op when another process shares the
# cores (2-core VM: a backbone step went from 3.5 s to 38 s); PASSIVE waiters sleep instead.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

# tests import their helpers (config_utils, released_checkpoints) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
