"""The engine and plain generation import without llguidance; structured output then names what is missing."""
import subprocess
import sys

CHILD = """
import sys
sys.modules["llguidance"] = None          # as if it were not installed
import leaplm.engine, leaplm.llm, leaplm.cli
assert "leaplm.constrain.llguidance_backend" not in sys.modules
try:
    from leaplm.constrain import compile_constraint
except ImportError as e:
    print("refused:", e)
"""


def test_engine_imports_without_llguidance_and_structured_output_says_why():
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "refused: structured output needs the llguidance package" in run.stdout


def test_backend_names_resolve_when_llguidance_is_there():
    import leaplm.constrain as c

    assert callable(c.compile_constraint) and c.DEFAULT_TIMEOUT_S > 0
