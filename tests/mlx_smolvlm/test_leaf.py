"""mlx_smolvlm is a leaf library: no module of it imports the router or the benchmarks."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
APPLICATIONS = {"router", "benchmarks"}

# Imports every module of the package, then prints the application packages that came along.
IMPORT_ALL = """
import pkgutil, sys
import mlx_smolvlm
for module in pkgutil.walk_packages(mlx_smolvlm.__path__, "mlx_smolvlm."):
    __import__(module.name)
print(sorted({name.split(".")[0] for name in sys.modules} & {"router", "benchmarks"}))
"""


def test_importing_every_module_of_mlx_smolvlm_loads_no_application():
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_no_import_statement_of_mlx_smolvlm_names_an_application():
    # Also the imports inside functions, which importing the modules does not run.
    found = []
    for path in sorted((ROOT / "mlx_smolvlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in APPLICATIONS]
    assert found == []
