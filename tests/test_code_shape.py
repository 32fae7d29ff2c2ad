"""The library stays readable: short functions, and a training loop without deep nesting."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "scllm"
MAX_LINES = 80
KNOWN_LONG: set = set()  # none: split a function before it grows past MAX_LINES
BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.Try)


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def nesting(node: ast.AST, depth: int = 0) -> int:
    """Deepest block (for, while, if, with, try) nesting inside a function, not counting inner
    functions (they are measured on their own)."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, nesting(child, depth + isinstance(child, BLOCKS)))
    return deepest


def test_no_library_function_is_longer_than_80_lines():
    long = {
        (str(path.relative_to(SRC)), f.name): f.end_lineno - f.lineno + 1
        for path in sorted(SRC.rglob("*.py"))
        for f in functions(path)
        if f.end_lineno - f.lineno + 1 > MAX_LINES
    }
    assert set(long) <= KNOWN_LONG, long


def test_training_loop_nests_at_most_three_blocks_deep():
    deep = {f.name: nesting(f) for f in functions(SRC / "train" / "loop.py") if nesting(f) > 3}
    assert not deep, deep


def test_nesting_counts_blocks():
    code = "def f(x):\n    for a in x:\n        if a:\n            with a:\n                pass\n"
    assert nesting(next(functions_of(code))) == 3


def functions_of(code: str):
    return (n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef))


# --- layers: imports go downward only ------------------------------------------------------------

# The ground floor, shared by all; the three packages; the top (the public API and the commands).
GROUND = {"errors", "config", "checks", "files", "h5ad", "tokens", "shards", "model"}
PACKAGES = ("prep", "train", "eval")
TOP = {"__init__", "cli", "launch"}
# What each layer may import. eval embeds with a trained model (train.checkpoint.load_model) but
# never reaches into the training loop; train and prep do not know each other.
MAY_IMPORT = {
    "ground": {"ground"},
    "prep": {"ground", "prep"},
    "train": {"ground", "train"},
    "eval": {"ground", "prep", "eval", "train.checkpoint"},
}
# Modules the torch-less environments run (envs/data.yaml, envs/eval.yaml): torch only inside
# functions there.
WITHOUT_TORCH = (
    "prep",
    "eval/baselines.py",
    "eval/evaluate.py",
    "eval/metrics.py",
    "eval/report.py",
    "eval/genes.py",
    "eval/scib.py",
    "eval/provenance.py",
    "train/loss_curve.py",  # the loss curves, drawn without the training stack
)
MAX_PARAMETERS = 8
# A stage function whose keywords are its config/schema.yaml section (tests/test_config.py holds
# them to the schema's defaults): normalize_bin's section has five settings, beside its two
# inputs, its output and chunk_size.
KNOWN_WIDE = {("prep/binning.py", "normalize_bin")}


def layer(module: str) -> str:
    """'ground', 'prep', 'train', 'eval' or 'top' for a dotted module name below scllm."""
    first = module.split(".")[0]
    if first in PACKAGES:
        return first
    if first in GROUND:
        return "ground"
    assert first in TOP, f"scllm.{module} is in no layer: add it to GROUND, PACKAGES or TOP"
    return "top"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def scllm_imports(path: Path):
    """(imported module below scllm, names, line) of every import in a file, functions
    included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scllm."):
                    yield alias.name[len("scllm.") :], [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "scllm":
                for alias in node.names:  # from scllm import x: module x, or a name of scllm
                    yield alias.name, [], node.lineno
            elif node.module.startswith("scllm."):
                names = [a.name for a in node.names]
                yield node.module[len("scllm.") :], names, node.lineno


def allowed(importer: str, imported: str) -> bool:
    if imported == "__version__":  # the package's own version: a value, not a module
        return True
    source, target = layer(importer), layer(imported)
    if source == "top":
        return True
    return target in MAY_IMPORT[source] or any(
        imported == m or imported.startswith(m + ".") for m in MAY_IMPORT[source] if "." in m
    )


def test_imports_go_downward_only():
    wrong = [
        f"{path.relative_to(SRC)}:{line}: scllm.{module_name(path)} imports scllm.{imported}"
        for path in sorted(SRC.rglob("*.py"))
        for imported, _, line in scllm_imports(path)
        if not allowed(module_name(path), imported)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import():
    assert not allowed("shards", "prep.tokenize")
    assert not allowed("eval.embed", "train.loop") and allowed("eval.embed", "train.checkpoint")
    assert not allowed("prep.census", "train.loop") and not allowed("train.loop", "eval.embed")
    assert allowed("cli", "prep.store") and allowed("eval.evaluate", "prep.hvg")


def test_no_module_imports_another_ones_private_names():
    private = [
        f"{path.relative_to(SRC)}:{line}: {name} from scllm.{imported}"
        for path in sorted(SRC.rglob("*.py"))
        for imported, names, line in scllm_imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_the_torch_less_stages_import_torch_only_inside_functions():
    paths = [
        p for p in sorted(SRC.rglob("*.py")) if str(p.relative_to(SRC)).startswith(WITHOUT_TORCH)
    ]
    paths += [SRC / f"{name}.py" for name in sorted(GROUND - {"model"})]
    at_top = []
    for path in paths:
        for node in ast.parse(path.read_text()).body:  # module level, TYPE_CHECKING blocks aside
            imports = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            names = [a.name for n in imports for a in n.names] + [
                n.module or "" for n in imports if isinstance(n, ast.ImportFrom)
            ]
            if any(name == "torch" or name.startswith("torch.") for name in names):
                at_top.append(str(path.relative_to(SRC)))
            modules = [n.module for n in imports if isinstance(n, ast.ImportFrom) and n.module]
            if any(layer_of_torch(m) for m in modules):
                at_top.append(f"{path.relative_to(SRC)} (through {modules})")
    assert not at_top, at_top


def layer_of_torch(module: str) -> bool:
    """Whether importing this scllm module at module level imports torch."""
    return module in ("scllm.model",) or module.startswith(("scllm.train", "scllm.eval.embed"))


def parameters(f: ast.FunctionDef) -> int:
    args = f.args
    names = [a.arg for a in args.posonlyargs + args.args]
    n = len(names) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)
    return n - (bool(names) and names[0] in ("self", "cls"))


def test_no_library_function_takes_more_than_8_parameters():
    wide = {
        (str(path.relative_to(SRC)), f.name): parameters(f)
        for path in sorted(SRC.rglob("*.py"))
        for f in functions(path)
        if parameters(f) > MAX_PARAMETERS
    }
    assert set(wide) <= KNOWN_WIDE, {k: v for k, v in wide.items() if k not in KNOWN_WIDE}


def test_parameters_counts_every_kind():
    code = "def f(self, a, /, b, *c, d, e=1, **f):\n    pass\n"
    assert parameters(next(functions_of(code))) == 6
