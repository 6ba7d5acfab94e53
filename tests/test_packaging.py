"""House rules that keep the project honest: the two dependency lists agree, CI runs the README's
test command, and the package's import graph follows the architecture (no cycles, components
import only the ground floor)."""
import ast
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

from .conftest import ROOT

# conda-forge names that differ from PyPI names
CONDA_TO_PYPI = {"pytorch": "torch", "pysoundfile": "soundfile", "soxr-python": "soxr"}
GROUND_FLOOR = {"config", "audio", "text_tokenizer", "textnorm", "data", "engines", "instruct", "train"}
# plotting helpers for the notebooks may draw any component, but nothing imports them back
TOP = {"pipeline", "frontend", "official", "eval", "eval_instruct", "finetune", "widgets", "viz", "speed", "__main__"}
COMPONENTS = {"fsq", "speech_tokenizer", "lm", "masks", "flow", "hift", "campplus", "rl"}
# the few places where one paper concept is built from another (acyclic, checked below)
# (the lm and flow training recipes read speech tokens / x-vectors of the corpus; the vocoder can
# be fine-tuned on the flow's own mels)
COMPONENT_DEPS = {"speech_tokenizer": {"fsq"}, "lm": {"speech_tokenizer"},
                  "flow": {"masks", "speech_tokenizer", "campplus"}, "rl": {"lm", "fsq", "speech_tokenizer"},
                  "hift": {"flow"}}
# concepts split over several files belong to their component
FAMILY = {"flow_encoder": "flow", "flow_estimator": "flow", "flow_cfm": "flow", "lm_sampling": "lm", "lm_align": "lm", "lm_train": "lm", "hift_train": "hift"}


def _name(req: str) -> str:
    return re.split(r"[<>=!\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pypi = {_name(r) for r in project["dependencies"]}
    for extra in ("dev", "data", "eval"):
        pypi |= {_name(r) for r in project["optional-dependencies"][extra]}
    conda = set()
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"^\s+- ([A-Za-z0-9_.\-]+)", line)
        if m and m.group(1) not in ("python", "pip", "conda-forge"):
            conda.add(CONDA_TO_PYPI.get(m.group(1).lower(), m.group(1).lower()))
    assert conda == pypi, f"only in environment.yml: {conda - pypi}; only in pyproject: {pypi - conda}"


def test_ci_runs_the_readme_test_command():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    command = [ln for ln in lines if ln and not re.match(r"(#|set |export |cd )", ln)][-1]
    assert command == "make test"
    assert f"`{command}`" in (ROOT / "README.md").read_text() or f"\n{command}\n" in (ROOT / "README.md").read_text()


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minicosy."):
            found.add(node.module.split(".")[1])
    return found - {""}


def test_import_graph_follows_the_architecture():
    graph = {p.stem: _imports(p) for p in (ROOT / "minicosy").glob("*.py") if p.stem != "__init__"}
    for module, deps in graph.items():
        family = FAMILY.get(module, module)
        if family in COMPONENTS:
            foreign = {FAMILY.get(d, d) for d in deps} - {family} - GROUND_FLOOR - COMPONENT_DEPS.get(family, set())
            assert not foreign, f"component {module} imports {foreign}: only the ground floor (and COMPONENT_DEPS)"
        if module in GROUND_FLOOR:
            assert deps <= GROUND_FLOOR, f"ground-floor {module} imports {deps - GROUND_FLOOR}"
        if module not in TOP:
            assert not deps & TOP, f"{module} imports the top floor: {deps & TOP}"

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        for dep in graph.get(node, ()):
            visit(dep, stack + [node])

    for module in graph:
        visit(module, [])


def test_modules_stay_readable():
    for path in (ROOT / "minicosy").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 700, f"{path.name} is over 700 lines: split it by concept"
