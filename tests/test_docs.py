"""The documentation cannot drift from the code: README.md and docs/*.md are read as a user reads
them, and every command and setting they show is checked against what the code accepts.

- every `key=value` Hydra override in a shell block composes against the schema (Hydra's compose
  API + train.config.load_config, as tests/test_recipes.py);
- every `python -m MODULE` names a module that exists, and only flags its argument parser defines;
  every `bash launch/X.sh` / `sbatch launch/...` / `python bench/X.py` names a file of the
  repository, with only the flags it parses (argparse, or a script's own `case`); the commands
  inside `sbatch --wrap "..."` are checked the same way;
- the configuration reference (docs/configuration.md) lists every key of the schema, with the
  schema's default and the one `python -m train` (experiment=quickstart) runs with;
- every docs/ page is linked from README.md, README.md has at most 220 lines, no link points
  outside the repository or to a missing file (a docs/*.md page not written yet is tolerated), and
  no page speaks of files or machines that are not the user's (BUILD_HOST_WORDS);
- the cluster walkthrough's job is launch/slurm.sbatch, the script tests/launch/test_slurm.py runs.

Pages other people add to docs/ are checked the same way: the test reads whatever is there.
`python tests/test_docs.py --fix-config-defaults` rewrites the two default columns of the
configuration reference from the schema and the recipes (and names keys the reference lacks).
"""
from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIG_PAGE = DOCS / "configuration.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))] if DOCS.is_dir() else [README]

# Hydra groups (recipes/<group>/) and the top-level keys an override may start with.
GROUPS = {p.name for p in (ROOT / "recipes").iterdir() if p.is_dir()}
OVERRIDE = re.compile(r"^\+{0,2}~?([A-Za-z_][\w.]*)=(.*)$")
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
# Files that are not in the repository, and words about the machines it was built on.
BUILD_HOST_WORDS = [r"\.\./shared", r"ANCHORS\.md", r"LAYERSKIP\.md", r"\$OUT\b", r"this machine",
                    r"\blent\b", r"anchor kit"]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- reading the pages

def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1).strip().lower(), m.group(2))
            for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(text: str) -> list[str]:
    """Commands of the shell blocks (continuation lines joined, comments dropped) and of inline
    code spans that start with a command word (`python -m ...`, `bash launch/...`, ...)."""
    out = []
    for lang, body in code_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        for line in body.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if line and not line.startswith("#"):
                out.append(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if re.match(r"(\w+=\S+ )*(python|bash|sbatch|torchrun|srun) ", span):
            out.append(span)
    return out


def split_command(line: str) -> list[list[str]]:
    """A command line as its simple commands (split at ;, &&, ||, |), each as shell words with
    leading VAR=value assignments and the `env`/`srun ...` prefixes removed. Placeholders written
    as `…` or `[...]` (optional arguments) are dropped."""
    line = re.sub(r"\s#.*$", "", line)  # trailing comment
    line = line.replace("…", "").replace("...", "")
    line = re.sub(r"\[[^\]=]*\]", "", line)  # [--step N]-style optional arguments
    try:
        words = shlex.split(line, posix=True)
    except ValueError:
        words = line.split()
    commands, current = [], []
    for w in words:
        if w in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(w)
    commands.append(current)
    result = []
    for cmd in commands:
        while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        if cmd and cmd[0] == "env":
            cmd = cmd[1:]
            while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):
                cmd = cmd[1:]
        if cmd:
            result.append(cmd)
    return result


def all_commands() -> list[tuple[Path, list[str]]]:
    return [(page, cmd) for page in PAGES for line in shell_commands(page.read_text())
            for cmd in split_command(line)]


# --------------------------------------------------------------------------- what the code accepts

def module_path(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__main__.py"):
        if p.is_file():
            return p
    return None


def _add_argument_flags(tree: ast.AST) -> tuple[set[str], bool]:
    flags, has_parser = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            has_parser = True
            flags |= {a.value for a in node.args
                      if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-")}
    return flags, has_parser


def argparse_flags(path: Path) -> set[str] | None:
    """The option strings of every add_argument call in a file, and in the functions of this
    repository's modules it imports and calls (`add_sampling_args(ap)`); None: it has no argparse."""
    tree = ast.parse(path.read_text())
    flags, has_parser = _add_argument_flags(tree)
    imported = {alias.asname or alias.name: node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module
                and node.module.split(".")[0] in ("train", "parallel", "bench") for alias in node.names}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    for name in called & set(imported):
        source = module_path(imported[name])
        if source is None:
            continue
        for fn in ast.walk(ast.parse(source.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.name == name:
                more, parser = _add_argument_flags(fn)
                flags |= more
                has_parser |= parser
    return (flags | {"-h", "--help"}) if has_parser else None


def shell_flags(path: Path) -> set[str]:
    """The flags a launch script's `case` parses (`--nnodes) ...`)."""
    return set(re.findall(r"^\s*(--[\w-]+)(?:=\*)?(?:\|[^)]*)?\)", path.read_text(), re.M)) | {"-h", "--help"}


HYDRA_MODULES = {"train", "train.data.prepare"}  # take key=value overrides, not flags


def _flags_used(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and a not in ("-", "--")]


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if OVERRIDE.match(a) and not a.startswith("-")]


def check_command(cmd: list[str]) -> tuple[list[str], list[str]]:
    """(problems, Hydra overrides to compose) for one simple command."""
    problems, overrides = [], []
    prog = Path(cmd[0]).name
    if prog in ("python", "python3") and len(cmd) > 2 and cmd[1] == "-m":
        module, args = cmd[2], cmd[3:]
        if module in HYDRA_MODULES:
            overrides = _overrides(args)
        elif module.split(".")[0] in ("train", "parallel", "bench"):
            path = module_path(module)
            if path is None:
                problems.append(f"python -m {module}: no such module")
            else:
                flags = argparse_flags(path)
                bad = [f for f in _flags_used(args) if flags is not None and f not in flags]
                if bad:
                    problems.append(f"python -m {module}: no flag {bad} (has {sorted(flags)})")
    elif prog in ("python", "python3") and len(cmd) > 1 and cmd[1].endswith(".py"):
        path = ROOT / cmd[1]
        if not path.is_file():
            problems.append(f"{cmd[1]}: no such file")
        else:
            flags = argparse_flags(path)
            bad = [f for f in _flags_used(cmd[2:]) if flags is not None and f not in flags]
            if bad:
                problems.append(f"{cmd[1]}: no flag {bad} (has {sorted(flags)})")
    elif prog in ("torchrun", "srun"):
        if "-m" in cmd:
            i = cmd.index("-m")
            sub = ["python", "-m", *cmd[i + 1:]]
            p, overrides = check_command(sub)
            problems += p
    elif prog == "sbatch" and any(a.startswith("--wrap") for a in cmd):
        i = next(i for i, a in enumerate(cmd) if a.startswith("--wrap"))
        wrapped = cmd[i].split("=", 1)[1] if "=" in cmd[i] else cmd[i + 1]
        for sub in split_command(wrapped):
            p, o = check_command(sub)
            problems += p
            overrides = overrides or o
    elif prog in ("bash", "sbatch", "sh"):
        script = next((a for a in cmd[1:] if not a.startswith("-")), None)
        if script and ("/" in script or script.endswith((".sh", ".sbatch"))):
            path = ROOT / script
            if not path.is_file():
                problems.append(f"{script}: no such file")
            else:
                args = cmd[cmd.index(script) + 1:]
                if script.startswith("launch/"):
                    overrides = _overrides(args)
                flags = shell_flags(path)
                if flags - {"-h", "--help"}:  # a script that parses flags itself (multi_node.sh, gpu_suite.sh)
                    bad = [f for f in _flags_used(args) if f not in flags]
                    if bad:
                        problems.append(f"{script}: no flag {bad} (has {sorted(flags)})")
    return problems, overrides


# --------------------------------------------------------------------------- composing overrides

def _placeholder(value: str) -> bool:
    """`model.init_from=HF_DIR`, `parallel.dry_run=WORLD`, `checkpoint.resume=<step>`, `run_dir=…`:
    values a user fills in. Only their key is checked."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(/.*)?|<[^>]*>|", value))


def compose_overrides(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        return load_config(compose("train", overrides=overrides))


PATH_KEYS = {"init_from", "source", "tokenizer", "run_dir", "out", "cache_dir", "dry_run_json"}


def _composable(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides to compose, keys of placeholder overrides to check by name only)."""
    out, keys = [], []
    for o in overrides:
        key, value = OVERRIDE.match(o).groups()
        if not _placeholder(value):
            out.append(f"{key}={value}")
        elif key.rsplit(".", 1)[-1] in PATH_KEYS:  # a path: any string composes, and model=hf needs one
            out.append(f"{key}=/some/path")
        else:
            keys.append(key)
    return out, keys


# --------------------------------------------------------------------------- the schema's keys

def schema_keys() -> list[tuple[str, typing.Any]]:
    """(dotted key, schema default) of every leaf of train.config.Config, in order."""
    from train import config as C

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.metadata.get("key", f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, key + ".")
            elif inner and typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
                yield key, default  # an optional section (model.rope_scaling): null, or its keys
                yield from walk(inner[0], key + ".")
            else:
                yield key, default
    return list(walk(C.Config, ""))


def lookup(obj, key: str):
    for part in key.split("."):
        if obj is None:
            return None
        name = part
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                if f.metadata.get("key", f.name) == part:
                    name = f.name
        obj = getattr(obj, name)
    return obj


def render(value) -> str:
    """A value as YAML writes it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):
        return "{" + ", ".join(f"{f.name}: {render(getattr(value, f.name))}" for f in dataclasses.fields(value)) + "}"
    return str(value)


def quickstart_value(cfg, key: str) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else None
    if parent and lookup(cfg, parent) is None:
        return "—"  # a key of an optional section that the quickstart leaves null
    return render(lookup(cfg, key))


ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \| `([^`]*)` \|(.*)$")


def config_rows(text: str) -> dict[str, tuple[str, str]]:
    return {m.group(1): (m.group(2), m.group(3)) for m in map(ROW.match, text.splitlines()) if m}


# =========================================================================== tests

def test_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines (at most 220)"
    readme = README.read_text()
    unlinked = [p.name for p in DOCS.glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


def test_every_measurement_file_is_listed_with_its_command_date_and_commit():
    """bench/results/README.md is the index of the measurements: a file not in it has no stated
    command, date or commit."""
    results = ROOT / "bench" / "results"
    rows = [line for line in (results / "README.md").read_text().splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`([\w.-]+\.\w+)`", row.split(" | ")[0])}
    stems = {name.rsplit(".", 1)[0] for name in listed}
    missing = [f.name for f in results.iterdir() if f.name != "README.md"
               and f.name not in listed and f.stem not in stems]
    assert not missing, f"bench/results/README.md does not list: {missing}"
    for row in rows:
        cells = row.split(" | ")
        assert len(cells) >= 5 and re.search(r"\d{4}-\d\d-\d\d", cells[3]) and re.search(r"[0-9a-f]{7}", cells[4]), \
            f"bench/results/README.md: a row without a date or a commit: {row[:80]}"


def test_links_and_paths_stay_inside_the_repository():
    problems = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if ROOT not in path.parents and path != ROOT:
                problems.append(f"{_rel(page)}: link {target} leaves the repository")
            elif not path.exists() and not (path.parent == DOCS and path.suffix == ".md"):
                problems.append(f"{_rel(page)}: link {target} does not exist")
        for bad in BUILD_HOST_WORDS:
            if re.search(bad, text):
                problems.append(f"{_rel(page)}: mentions {bad!r}")
    assert not problems, "\n".join(problems)


def test_commands_name_entry_points_and_flags_that_exist():
    problems, seen = [], 0
    for page, cmd in all_commands():
        p, _ = check_command(cmd)
        seen += 1
        problems += [f"{_rel(page)}: {' '.join(cmd)[:120]}\n    {x}" for x in p]
    assert seen > 10  # the pages do show commands
    assert not problems, "\n".join(problems)


def test_overrides_compose_against_the_schema():
    """Each command's overrides compose together (one command, one config), as the user types them."""
    from train.config import ConfigError
    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    register_schemas()
    known = {k for k, _ in schema_keys()} | GROUPS
    known |= {k.rsplit(".", 1)[0] for k in known if "." in k}
    where: dict[tuple[str, ...], list[str]] = {}  # each distinct command line once (Hydra takes ~0.2 s)
    unknown = []
    for page, cmd in all_commands():
        _, overrides = check_command(cmd)
        if overrides:
            composable, placeholder_keys = _composable(overrides)
            unknown += [f"{_rel(page)}: {k}=… is not a key of the schema" for k in placeholder_keys
                        if k not in known]
            where.setdefault(tuple(composable), []).append(_rel(page))
    problems, composed = [], 0
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        for overrides, pages in where.items():
            try:
                load_config(compose("train", overrides=list(overrides)))
                composed += 1
            except ConfigError as e:
                problems.append(f"{pages[0]}: {' '.join(overrides)}\n    {e}")
            except Exception as e:  # Hydra: unknown key, group option or syntax
                problems.append(f"{pages[0]}: {' '.join(overrides)}\n    {type(e).__name__}: "
                                f"{str(e).splitlines()[0]}")
    assert composed > 5
    problems += unknown
    assert not problems, "\n".join(problems)


def test_inline_overrides_name_schema_keys():
    """`key=value` spans in prose (`data.batch_size=8`) name keys or groups that exist."""
    keys = {k for k, _ in schema_keys()}
    prefixes = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    problems = []
    for page in PAGES:
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for span in re.findall(r"`([a-z_][\w.]*)=([^`\s]*)`", prose):
            key = span[0]
            if key in keys or key in GROUPS or key in prefixes or key in ("run_dir", "experiment"):
                continue
            if key.split(".")[0] not in {k.split(".")[0] for k in keys} | GROUPS:
                continue  # not a setting (an environment variable, a Python keyword argument)
            problems.append(f"{_rel(page)}: `{key}=...` is not a key of the schema")
    assert not problems, "\n".join(problems)


def test_the_walkthrough_submits_the_script_the_slurm_test_runs():
    """The cluster walkthrough's job is launch/slurm.sbatch, the file tests/launch/test_slurm.py
    submits to a real Slurm, warns and requeues; its time-limit warning is the one the page explains."""
    page = DOCS / "cluster_walkthrough.md"
    submitted = [cmd for p, cmd in all_commands() if p == page and cmd[0] == "sbatch"
                 and not any(a.startswith("--wrap") for a in cmd)]
    assert submitted and all("launch/slurm.sbatch" in cmd for cmd in submitted)
    assert all(any(a.startswith("--time=") for a in cmd) for cmd in submitted), "give every job a time limit"
    assert '"launch" / "slurm.sbatch"' in (ROOT / "tests" / "launch" / "test_slurm.py").read_text()
    script = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    assert "--signal=B:USR1@120" in page.read_text()


@pytest.mark.skipif(not CONFIG_PAGE.is_file(), reason="no docs/configuration.md")
def test_configuration_reference_defaults_are_the_codes():
    cfg = compose_overrides([])
    rows = config_rows(CONFIG_PAGE.read_text())
    problems = []
    for key, default in schema_keys():
        if key not in rows:
            problems.append(f"{key}: missing from docs/configuration.md")
            continue
        quick, schema = rows[key]
        if quick != quickstart_value(cfg, key):
            problems.append(f"{key}: python -m train runs with {quickstart_value(cfg, key)}, the page says {quick}")
        if schema != render(default):
            problems.append(f"{key}: the schema's default is {render(default)}, the page says {schema}")
    extra = set(rows) - {k for k, _ in schema_keys()}
    problems += [f"{k}: in docs/configuration.md but not a key of the schema" for k in sorted(extra)]
    assert not problems, "\n".join(problems) + "\n(python tests/test_docs.py --fix-config-defaults)"


def fix_config_defaults() -> None:
    cfg = compose_overrides([])
    schema = dict(schema_keys())
    lines = CONFIG_PAGE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = ROW.match(line)
        if m and m.group(1) in schema:
            key = m.group(1)
            lines[i] = f"| `{key}` | `{quickstart_value(cfg, key)}` | `{render(schema[key])}` |{m.group(4)}"
    CONFIG_PAGE.write_text("\n".join(lines) + "\n")
    missing = [k for k in schema if k not in config_rows(CONFIG_PAGE.read_text())]
    for k in missing:
        print(f"| `{k}` | `{quickstart_value(cfg, k)}` | `{render(schema[k])}` | (meaning) |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] == ["--fix-config-defaults"]:
        fix_config_defaults()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
