"""sdxl/code_inputs.py: a rule's code inputs are what its script's imports can reach."""

from __future__ import annotations

from pathlib import Path

from sdxl.code_inputs import script_code

ROOT = Path(__file__).resolve().parents[1]

TREE = {
    "scripts/job.py": """
from typing import TYPE_CHECKING
from helper import start
import json
import pkg.eager
from pkg import served_lazily
if TYPE_CHECKING:
    from pkg import only_for_types
""",
    "scripts/helper.py": "def start():\n    from pkg.sub import inner\n",
    "scripts/unused_helper.py": "import pkg.never\n",
    "pkg/__init__.py": """
def __getattr__(name):
    from pkg import lazy_target
    return getattr(lazy_target, name)
""",
    "pkg/eager.py": "import torch\nfrom . import relative\n",
    "pkg/relative.py": "from .sub.inner import thing\n",
    "pkg/lazy_target.py": "",
    "pkg/only_for_types.py": "",
    "pkg/never.py": "",
    "pkg/sub/__init__.py": "",
    "pkg/sub/inner.py": "def thing():\n    import pkg.switched_off\n",
    "pkg/switched_off.py": "import pkg.only_through_switched_off\n",
    "pkg/only_through_switched_off.py": "",
}


def _tree(root: Path) -> Path:
    for name, text in TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _names(files: list[Path], root: Path) -> set[str]:
    return {f.relative_to(root).as_posix() for f in files}


def test_every_reachable_import_counts(tmp_path):
    root = _tree(tmp_path)
    got = _names(script_code(root / "scripts/job.py", root), root)
    assert got == {
        "scripts/job.py",
        "scripts/helper.py",  # a helper beside the script, and its lazy import
        "pkg/__init__.py",  # the package of every module
        "pkg/eager.py",
        "pkg/relative.py",  # relative imports, from the module's package
        "pkg/sub/__init__.py",
        "pkg/sub/inner.py",
        "pkg/switched_off.py",  # inside a function: still counts
        "pkg/only_through_switched_off.py",
        "pkg/lazy_target.py",  # a name the package serves from its __getattr__
    }  # not: only_for_types (TYPE_CHECKING), never (an unused helper's), json/torch (not ours)


def test_a_package_getattr_counts_only_for_names_it_serves(tmp_path):
    root = _tree(tmp_path)
    (root / "scripts/job.py").write_text("import pkg.eager\n")
    got = _names(script_code(root / "scripts/job.py", root), root)
    assert "pkg/lazy_target.py" not in got and "pkg/__init__.py" in got


def test_without_drops_a_module_and_what_only_it_imports(tmp_path):
    root = _tree(tmp_path)
    got = _names(script_code(root / "scripts/job.py", root, ["pkg.switched_off"]), root)
    assert "pkg/switched_off.py" not in got and "pkg/only_through_switched_off.py" not in got
    assert "pkg/sub/inner.py" in got


def test_an_edit_is_seen_in_the_same_process(tmp_path):
    root = _tree(tmp_path)
    script_code(root / "scripts/job.py", root)
    (root / "pkg/lazy_target.py").write_text("import pkg.never\n")
    assert "pkg/never.py" in _names(script_code(root / "scripts/job.py", root), root)


def test_the_repository_scripts():
    scripts = sorted((ROOT / "workflow_scripts").glob("*.py"))
    found = {s.stem: _names(script_code(s, ROOT), ROOT) for s in scripts}
    assert "sdxl/models/unet.py" in found["train_lora"]
    assert "workflow_scripts/common.py" in found["report"]
    assert not any(f.startswith("sdxl/train/") for f in found["validate_captions"])


def test_a_model_folder_source_never_loads_the_tiny_model_code(tmp_path):
    """The weights rule leaves sdxl/tiny.py out of its code inputs unless the source is
    builtin:tiny (rules/common.smk weights_code): the weights stage must not load it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sdxl import prepare, weights\n"
        "try:\n"
        f"    weights.check_model_source({str(tmp_path)!r})\n"
        "except weights.WeightsError:\n"
        "    pass\n"
        "assert 'sdxl.tiny' not in sys.modules, 'sdxl.tiny was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
