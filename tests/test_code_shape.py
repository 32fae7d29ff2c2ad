"""The library stays readable: short functions, and a training loop without deep nesting."""

from __future__ import annotations

import ast
import re
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


def code_lines(f: ast.FunctionDef) -> int:
    """A function's lines from ``def`` to its end, its docstring left out: the rule is about how
    much code there is to read, and a numpydoc docstring grows with the parameters it lists."""
    first = f.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    doc = (
        first.end_lineno - first.lineno + 1
        if has_doc and isinstance(first.value.value, str)
        else 0
    )
    return f.end_lineno - f.lineno + 1 - doc


def test_no_library_function_is_longer_than_80_lines():
    long = {
        (str(path.relative_to(SRC)), f.name): code_lines(f)
        for path in sorted(SRC.rglob("*.py"))
        for f in functions(path)
        if code_lines(f) > MAX_LINES
    }
    assert set(long) <= KNOWN_LONG, long


def test_length_counts_the_code_not_the_docstring():
    code = 'def f(x):\n    """Summary.\n\n    More.\n    """\n    y = x\n    return y\n'
    assert code_lines(next(functions_of(code))) == 3


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
GROUND = {
    "errors",
    "config",
    "workflow_config",
    "provenance",
    "checks",
    "files",
    "h5ad",
    "tokens",
    "shards",
    "model",
}
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
    "eval/qc_plots.py",
    "workflow_config.py",  # the Snakefile imports it before any job
    "provenance.py",
    "eval/scib.py",
    "eval/how_made.py",
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


# --- numpydoc: the Python API documents its parameters and what it returns -----------------------

SECTION_RULE = re.compile(r"-{3,}")
# Decorators that make a method an attribute: a property is documented as what it is, in one
# line, with neither Parameters (it takes none) nor Returns.
ATTRIBUTES = {"property", "cached_property", "functools.cached_property"}
INNER_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def docstring_sections(doc: str) -> dict[str, list[str]]:
    """A numpydoc docstring's sections: title (the line above a rule of dashes) -> its lines."""
    lines = doc.splitlines()
    sections: dict[str, list[str]] = {}
    current = None
    for i, line in enumerate(lines):
        if SECTION_RULE.fullmatch(line.strip()):
            continue
        if line.strip() and i + 1 < len(lines) and SECTION_RULE.fullmatch(lines[i + 1].strip()):
            current = sections.setdefault(line.strip(), [])
        elif current is not None:
            current.append(line)
    return sections


def documented_parameters(lines: list[str]) -> list[str]:
    """The names a Parameters section lists: its unindented lines, ``name : type`` or ``name``;
    ``a, b : int`` lists two."""
    entries = [line.split(" : ")[0] for line in lines if line.strip() and line == line.lstrip()]
    return [name.strip() for entry in entries for name in entry.split(",")]


def signature(f: ast.FunctionDef, method: bool = True) -> list[str]:
    """A function's parameter names as its Parameters section lists them (a method's self and
    cls aside, ``*args`` and ``**kwargs`` with their stars). A module function's ``cls`` (a
    class it is given) is a parameter like any other."""
    args = f.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if method and names and names[0] in ("self", "cls"):
        names = names[1:]
    names += [f"*{args.vararg.arg}"] if args.vararg else []
    names += [a.arg for a in args.kwonlyargs]
    return names + ([f"**{args.kwarg.arg}"] if args.kwarg else [])


def own_nodes(f: ast.AST):
    """The nodes of a function's body, its inner functions, lambdas and classes left out."""
    for child in ast.iter_child_nodes(f):
        if not isinstance(child, INNER_SCOPES):
            yield child
            yield from own_nodes(child)


def returns_a_value(f: ast.FunctionDef) -> bool:
    """A return annotation other than None, a ``return <value>`` or a ``yield``."""
    annotated = f.returns is not None and not (
        isinstance(f.returns, ast.Constant) and f.returns.value in (None, "None")
    )
    return annotated or any(
        isinstance(n, (ast.Yield, ast.YieldFrom))
        or isinstance(n, ast.Return)
        and n.value is not None
        and not (isinstance(n.value, ast.Constant) and n.value.value is None)
        for n in own_nodes(f)
    )


def public_api(tree: ast.Module):
    """(function, its qualified name, the docstring that documents its parameters) of every
    public function: the module's own and the methods of its public classes, without a leading
    underscore, properties aside; a class's ``__init__`` is documented by the class docstring, as
    numpydoc has it."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_"):
                yield node, node.name, ast.get_docstring(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for f in node.body:
                if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                decorators = {ast.unparse(d) for d in f.decorator_list}
                if f.name == "__init__":
                    yield f, f"{node.name}.__init__", ast.get_docstring(node)
                elif not f.name.startswith("_") and not decorators & ATTRIBUTES:
                    yield f, f"{node.name}.{f.name}", ast.get_docstring(f)


def numpydoc_problems(source: str, where: str = "<string>") -> list[str]:
    """``where:line name: what is missing`` for each public function of ``source`` whose docstring
    lacks a Parameters section listing exactly its parameters (in order), or a Returns or Yields
    section while it returns a value."""
    problems = []
    for f, qualified, doc in public_api(ast.parse(source)):
        name = f"{where}:{f.lineno} {qualified}"
        if doc is None:
            problems.append(f"{name}: no docstring")
            continue
        sections = docstring_sections(doc)
        wanted = signature(f, method="." in qualified)
        listed = documented_parameters(sections.get("Parameters", []))
        if wanted and "Parameters" not in sections:
            problems.append(f"{name}: no Parameters section (for {', '.join(wanted)})")
        elif listed != wanted:
            missing = [p for p in wanted if p not in listed]
            extra = [p for p in listed if p not in wanted]
            what = [f"missing {', '.join(missing)}"] * bool(missing)
            what += [f"not parameters: {', '.join(extra)}"] * bool(extra)
            problems.append(f"{name}: Parameters {'; '.join(what) or 'out of order'}")
        if f.name != "__init__" and returns_a_value(f):
            if not {"Returns", "Yields"} & set(sections):
                problems.append(f"{name}: no Returns or Yields section")
    return problems


def test_the_public_functions_have_numpydoc_parameters_and_returns():
    problems = [
        problem
        for path in sorted(SRC.rglob("*.py"))
        for problem in numpydoc_problems(path.read_text(), str(path.relative_to(SRC)))
    ]
    assert not problems, "\n".join(problems)


def test_the_numpydoc_check_names_what_is_missing():
    code = '''
def undocumented(a):
    return a


def no_parameters(a, *, b=1) -> int:
    """Summary.

    Returns
    -------
    int
    """


def wrong_names(a, *rest, **options):
    """Summary.

    Parameters
    ----------
    a, rest : int
        Numbers.
    c
        Not one of them.
    """


def no_returns(a):
    """Summary.

    Parameters
    ----------
    a : int
        A number.
    """
    return a + 1


def generator():
    """Summary."""
    yield 1


def out_of_order(a, b):
    """Summary.

    Parameters
    ----------
    b, a : int
        Numbers.
    """


class Public:
    """Summary."""

    def __init__(self, size):
        self.size = size

    def method(self, x) -> None:
        """Summary."""

    @property
    def area(self) -> int:
        """A property: documented as an attribute."""
        return self.size**2


class _Private:
    def method(self, x):
        return x


def _helper(x):
    return x
'''
    assert numpydoc_problems(code, "m.py") == [
        "m.py:2 undocumented: no docstring",
        "m.py:6 no_parameters: no Parameters section (for a, b)",
        "m.py:15 wrong_names: Parameters missing *rest, **options; not parameters: rest, c",
        "m.py:27 no_returns: no Returns or Yields section",
        "m.py:38 generator: no Returns or Yields section",
        "m.py:43 out_of_order: Parameters out of order",
        "m.py:56 Public.__init__: no Parameters section (for size)",
        "m.py:59 Public.method: no Parameters section (for x)",
    ]


def test_the_numpydoc_check_passes_a_documented_function():
    code = '''
def f(a, b=2, *args, c, **kwargs) -> dict:
    """Summary line.

    Extended text that mentions Parameters without a rule under it.

    Parameters
    ----------
    a, b : int
        Numbers.
    *args : str
        Names.
    c : bool
        A flag; its description may run
        over lines: ``x : y`` inside is no entry.
    **kwargs
        Passed on.

    Returns
    -------
    dict
        What it made.
    """
    def inner(x):
        return x

    return {}


def g(x) -> None:
    """Summary.

    Parameters
    ----------
    x : int
        Ignored.
    """
    return None


def of_class(cls, x) -> None:
    """Summary.

    Parameters
    ----------
    cls : type
        A module function's cls is a parameter.
    x : int
        Ignored.
    """
'''
    assert numpydoc_problems(code) == []
