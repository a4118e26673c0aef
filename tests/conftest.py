"""Test-session settings (loaded by pytest before any test module imports torch)."""
import os

# OpenMP threads spinning at barriers stall every parallel op when another process shares the
# cores (2-core VM: a backbone step went from 3.5 s to 38 s); PASSIVE waiters sleep instead.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
