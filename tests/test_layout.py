"""The shape of the package: importing it changes nothing global, and the library never imports the demo."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import chatforge

PACKAGE = Path(chatforge.__file__).parent

# What a library could change in the importing process without being asked: torch's process-wide hook
# registries and settings, the global RNG, and the environment.
SNAPSHOT = r"""
import json, os, torch
import torch.nn.modules.module as module_hooks
import torch.optim.optimizer as optimizer_hooks

def snapshot():
    hooks = {name: len(getattr(registry, name)) for registry, names in (
        (optimizer_hooks, ["_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"]),
        (module_hooks, ["_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                        "_global_backward_pre_hooks", "_global_module_registration_hooks",
                        "_global_parameter_registration_hooks", "_global_buffer_registration_hooks"]),
    ) for name in names}
    settings = {
        "default_dtype": str(torch.get_default_dtype()), "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(), "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic],
        "cuda_tf32": torch.backends.cuda.matmul.allow_tf32, "rng": torch.get_rng_state().sum().item(),
        "default_device": str(torch.get_default_device()),
    }
    return {"hooks": hooks, "settings": settings, "environ": dict(os.environ)}

before = snapshot()
import importlib, pkgutil, chatforge
names = sorted(m.name for m in pkgutil.walk_packages(chatforge.__path__, "chatforge."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "before": before, "after": snapshot()}))
"""


def test_importing_every_module_changes_no_global_state():
    out = subprocess.run([sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert len(result["modules"]) > 30 and "chatforge.engine" in result["modules"]  # every module was imported
    assert result["after"]["hooks"] == result["before"]["hooks"]
    assert result["after"]["settings"] == result["before"]["settings"]
    assert result["after"]["environ"] == result["before"]["environ"]


def imported_modules(path: Path) -> set[str]:
    """Every chatforge module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] == "chatforge"}


def test_the_library_never_imports_the_demo():
    """`chatforge.demo` is one use of the library, not part of it. The command line is the one exception:
    `chatforge run` is the demo's command."""
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module.startswith("chatforge.demo") or module == "chatforge.cli":
            continue
        demo = sorted(name for name in imported_modules(path) if name.startswith("chatforge.demo"))
        if demo:
            offenders[module] = demo
    assert not offenders, offenders
    assert any(name.startswith("chatforge.demo") for name in imported_modules(PACKAGE / "cli.py"))  # the walk sees imports


def test_every_module_is_in_the_package_walk():
    """A module the walk above misses (a folder without __init__.py) would escape both checks."""
    walked = {m.name for m in pkgutil.walk_packages(chatforge.__path__, "chatforge.")}
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
             for p in PACKAGE.rglob("*.py")}
    assert files - {"chatforge"} <= walked
