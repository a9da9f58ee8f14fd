"""The docs (README.md and docs/*.md) against the code, so that they cannot drift apart:

- every environment variable the code reads is in docs/configuration.md, and every variable
  documented there is read by the code (or is on a short, commented list of other tools' ones);
- every metric name written in the docs is one the bridge exports, and every metric it exports
  is in docs/operations.md;
- every outcome, fallback reason, hang-up reason and stream refusal the code can produce is in
  docs/failures.md, and nothing else is;
- every `bin/callbridge ...` command shown in a code block parses with the real CLI parser,
  every subcommand's --help works and is shown somewhere, and no command is shown bare
  (`callbridge ...` is not on PATH outside the virtualenv);
- every link between the docs leads to a file and a heading that exist, and every repository
  path they name exists.

Nothing here runs a command or opens a socket."""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import pytest
from pydantic import AliasChoices

from app.cli import build_parser
from app.config import Settings
from app.core.vocabulary import FallbackReason, HangupReason, Outcome, RejectReason
from app.observability.metrics import Metrics, WorkersProcessCollector

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIGURATION = DOCS / "configuration.md"
FAILURES = DOCS / "failures.md"
OPERATIONS = DOCS / "operations.md"

# Documented in docs/configuration.md because they change what callbridge does, but read only by
# other programs or by libraries on their own (never by name in app/). Keep this list small.
NOT_READ_BY_APP = frozenset(
    {
        "COMPOSE_PROFILES",  # docker compose: which services `docker compose up` starts
        "HTTP_PROXY",  # the HTTP clients and websockets read the proxy variables themselves
        "NO_PROXY",
        "WSS_PROXY",  # websockets only: a proxy for the agent's WebSocket
        "WS_PROXY",
    }
)

# docs/failures.md: the heading of each closed set's table, and the enum it must list exactly
ENDINGS: dict[str, type[StrEnum]] = {
    "Outcomes": Outcome,
    "Fallback reasons": FallbackReason,
    "Hang-up reasons": HangupReason,
    "Streams refused before they became calls": RejectReason,
}

SHELL_LANGUAGES = frozenset({"", "sh", "bash", "shell", "console"})
MIN_COMMANDS_SHOWN = 25  # the docs show more than this; fewer found means the collection broke
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
METRIC_NAME = re.compile(r"\b(?:callbridge|process)_[a-z0-9_]*[a-z0-9]")
FENCE = re.compile(r"^\s*```(\S*)\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
REPO_PATH = re.compile(r"(?:app|tests|deploy|bin|docs|\.ci)/[\w./+-]*")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- Markdown ----------------------------------------------------------------------------


def code_blocks(text: str) -> Iterator[tuple[str, list[str]]]:
    """Each fenced code block: its language ("" when none) and its lines."""
    language: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        fence = FENCE.match(line)
        if language is None:
            if fence:
                language, lines = fence.group(1), []
        elif fence and not fence.group(1):
            yield language, lines
            language = None
        else:
            lines.append(line)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    kept: list[str] = []
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


def table_first_cells(text: str) -> list[str]:
    """The first cell of every table row (header and separator rows included)."""
    return [line.split("|")[1] for line in text.splitlines() if line.startswith("|") and line.count("|") >= 3]


def section(text: str, heading: str) -> str:
    """The text under ``### heading`` (or ``## heading``) down to the next heading."""
    match = re.search(rf"^#{{2,3}} {re.escape(heading)}\n(.*?)(?=^#|\Z)", prose(text), flags=re.MULTILINE | re.DOTALL)
    assert match, f"no heading {heading!r}"
    return match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), flags=re.MULTILINE)
    return {slug(h) for h in headings}


# --- environment variables ---------------------------------------------------------------


def settings_variables() -> set[str]:
    """The variables pydantic-settings reads for ``Settings`` (names are case-insensitive)."""
    prefix = str(Settings.model_config.get("env_prefix") or "")
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        else:
            names.add((prefix + name).upper())
    return names


def literal_strings(node: ast.expr) -> list[str] | None:
    """A string constant, or a tuple/list/set of them; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        items = [literal_strings(item) for item in node.elts]
        if all(item is not None for item in items):
            return [value for item in items if item is not None for value in item]
    return None


def is_environ(node: ast.expr) -> bool:
    """``os.environ`` (or ``environ`` imported from os)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


class EnvironmentReads:
    """Every environment variable app/ reads by name: ``os.environ[...]``, ``os.environ.get``
    (``pop``, ``setdefault``), ``os.getenv``, and every module constant named ``ENV_*`` holding a
    variable's name (what the supervisor hands its workers). A name is worked out from a string,
    a constant of the same module or of any app module, or a loop over a tuple of strings; a read
    whose name cannot be worked out is reported, so that this scan is never silently blind."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.unresolved: list[str] = []
        self.trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in sorted(APP.rglob("*.py"))}
        self.constants: dict[str, list[str]] = {}  # module-level NAME = "..." in any app module
        for tree in self.trees.values():
            for node in tree.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    values = literal_strings(node.value)
                    if values is not None:
                        self.constants.setdefault(node.targets[0].id, []).extend(values)
                        if node.targets[0].id.startswith("ENV_"):
                            self.names |= {value.upper() for value in values if ENV_NAME.fullmatch(value)}
        for path, tree in self.trees.items():
            self._scan(path, tree)

    def _scan(self, path: Path, tree: ast.Module) -> None:
        bindings: dict[str, list[ast.expr]] = {}  # every binding of a name in this module, any scope
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        bindings.setdefault(target.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                bindings.setdefault(node.target.id, []).append(node.value)
            elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension) and isinstance(node.target, ast.Name):
                bindings.setdefault(node.target.id, []).append(node.iter)
        for node in ast.walk(tree):
            key: ast.expr | None = None
            if isinstance(node, ast.Subscript) and is_environ(node.value):
                key = node.slice
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault"):
                    key = node.args[0] if is_environ(func.value) else None
                elif (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                    isinstance(func, ast.Name) and func.id == "getenv"
                ):
                    key = node.args[0]
            if key is None:
                continue
            values = self._resolve(key, bindings, depth=0)
            if values:
                self.names |= {value.upper() for value in values}
            else:
                self.unresolved.append(f"{relative(path)}:{node.lineno}: {ast.unparse(node)}")

    def _resolve(self, node: ast.expr, bindings: dict[str, list[ast.expr]], depth: int) -> list[str]:
        if depth > 5:
            return []
        literal = literal_strings(node)
        if literal is not None:
            return literal
        if isinstance(node, ast.Name):
            found = [v for bound in bindings.get(node.id, []) for v in self._resolve(bound, bindings, depth + 1)]
            return found or self.constants.get(node.id, [])
        if isinstance(node, ast.Attribute):  # workers.ENV_MULTIPROC_DIR
            return self.constants.get(node.attr, [])
        return []


def documented_variables() -> set[str]:
    """The variables docs/configuration.md documents: those its tables' first cells name."""
    return {
        name
        for cell in table_first_cells(CONFIGURATION.read_text())
        for name in INLINE_CODE.findall(cell)
        if ENV_NAME.fullmatch(name)
    }


def test_configuration_documents_every_variable_the_code_reads_and_no_other() -> None:
    reads = EnvironmentReads()
    assert not reads.unresolved, "environment reads whose variable this test cannot name:\n" + "\n".join(
        reads.unresolved
    )
    read = settings_variables() | reads.names
    # the scan itself works: Settings, a plain os.environ.get, a name looped over, a worker's ENV_*
    assert {"DEEPGRAM_API_KEY", "FORWARDED_ALLOW_IPS", "HTTPS_PROXY", "CALLBRIDGE_WORKER_ID"} <= read
    documented = documented_variables()
    missing = sorted(read - documented)
    assert not missing, f"read by the code, not in {relative(CONFIGURATION)}: {missing}"
    unread = sorted(documented - read - NOT_READ_BY_APP)
    assert not unread, f"in {relative(CONFIGURATION)}, but nothing in app/ reads them: {unread}"
    assert not NOT_READ_BY_APP & read, "read by app/ after all: drop them from NOT_READ_BY_APP"


# --- metrics -----------------------------------------------------------------------------


def exported_families() -> dict[str, set[str]]:
    """Each metric family the bridge exports (as /metrics names it: a counter with _total), with
    every sample name it can carry. One process and workers (the summed process metrics)."""
    families = list(Metrics().registry.collect())
    with tempfile.TemporaryDirectory() as directory:
        families += list(WorkersProcessCollector(directory).collect())
    exported: dict[str, set[str]] = {}
    for family in families:
        if family.type == "counter":
            exported[family.name + "_total"] = {family.name + "_total"}
        elif family.type == "histogram":
            exported[family.name] = {family.name + suffix for suffix in ("", "_bucket", "_sum", "_count")}
        else:
            exported[family.name] = {family.name}
    return exported


def test_every_metric_named_in_the_docs_is_exported() -> None:
    exported = set().union(*exported_families().values())
    named = {(relative(path), name) for path in doc_files() for name in METRIC_NAME.findall(path.read_text())}
    assert len(named) >= 30, "the docs name fewer metrics than they do: the search is broken"
    unknown = sorted(f"{path}: {name}" for path, name in named if name not in exported)
    assert not unknown, "not exported by app/observability/metrics.py:\n" + "\n".join(unknown)


def test_every_exported_metric_is_in_the_metrics_reference() -> None:
    documented = set(METRIC_NAME.findall(section(OPERATIONS.read_text(), "Metrics")))
    missing = sorted(set(exported_families()) - documented)
    assert not missing, f"exported, but not in {relative(OPERATIONS)} (Metrics): {missing}"


# --- outcomes and reasons ----------------------------------------------------------------


@pytest.mark.parametrize("heading", list(ENDINGS))
def test_failures_lists_exactly_the_values_the_code_can_produce(heading: str) -> None:
    values = {value.value for value in ENDINGS[heading]}
    rows = table_first_cells(section(FAILURES.read_text(), heading))
    documented = {name for cell in rows for name in INLINE_CODE.findall(cell)} - {rows[0].strip().strip("`")}
    missing, unknown = sorted(values - documented), sorted(documented - values)
    assert not missing, f"{relative(FAILURES)}, {heading}: {missing} not documented"
    assert not unknown, f"{relative(FAILURES)}, {heading}: {unknown} are not values of {ENDINGS[heading].__name__}"


# --- commands ----------------------------------------------------------------------------


def without_comment(line: str) -> str:
    """The line up to a shell comment: a # outside quotes that starts a word."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(lines: list[str]) -> Iterator[str]:
    """The logical lines of a shell block: continuations joined, here-documents left out."""
    pending = ""
    terminator = ""
    for line in lines:
        if terminator:
            terminator = "" if line.strip() == terminator else terminator
            continue
        line = without_comment(line).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical, pending = pending + line, ""
        heredoc = HEREDOC.search(logical)
        if heredoc:
            terminator = heredoc.group(1)
        if logical.strip():
            yield logical


def commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line (split at && || ; |), assignments before them removed."""
    words = shlex.split(line)
    current: list[str] = []
    for word in [*words, ";"]:
        if word in ("&&", "||", ";", "|") or word.startswith((">", "<", "2>")):
            while current and ASSIGNMENT.match(current[0]):
                current.pop(0)
            if current:
                yield current
            current = [] if not word.startswith((">", "<", "2>")) else ["#redirect"]
        elif current[:1] != ["#redirect"]:
            current.append(word)


def shown_commands() -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Every `bin/callbridge` command in a code block of the docs, as (where, arguments); and
    every command shown as a bare `callbridge`, which is not on PATH outside the virtualenv."""
    shown: list[tuple[str, list[str]]] = []
    bare: list[str] = []
    for path in doc_files():
        for language, lines in code_blocks(path.read_text()):
            if language not in SHELL_LANGUAGES:
                continue
            for line in shell_lines(lines):
                try:
                    found = list(commands(line))
                except ValueError as exc:  # unbalanced quotes
                    assert "callbridge" not in line, f"{relative(path)}: cannot split {line!r}: {exc}"
                    continue
                for words in found:
                    if words[0] == "bin/callbridge" or words[0].endswith("/bin/callbridge"):
                        shown.append((f"{relative(path)}: {line.strip()}", words[1:]))
                    elif words[0] == "callbridge":
                        bare.append(f"{relative(path)}: {line.strip()}")
        for code in INLINE_CODE.findall(prose(path.read_text())):
            if re.match(r"callbridge [a-z]", code) and code.split()[1] in subcommand_names():
                bare.append(f"{relative(path)}: `{code}`")
    return shown, bare


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every (sub)command path of the CLI: ("serve",), ("twilio", "check"), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name)
                yield from subcommands(child, (*path, name))


def subcommand_names() -> set[str]:
    return {path[0] for path in subcommands(build_parser())}


def placeholder(word: str) -> bool:
    return bool(re.search(r"<[^>]*>", word)) or "..." in word


def strict_parser() -> argparse.ArgumentParser:
    """The CLI's parser, refusing abbreviated options: the docs show options in full."""
    parser = build_parser()
    pending = [parser]
    while pending:
        current = pending.pop()
        current.allow_abbrev = False
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return parser


def parse_problem(args: list[str]) -> str | None:
    """Why the CLI's parser refuses these arguments (None: they parse). Nothing is run."""
    args = ["1" if placeholder(arg) else arg for arg in args]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            namespace = strict_parser().parse_args(args)
    except SystemExit as exc:
        return None if exc.code == 0 else errors.getvalue().strip().splitlines()[-1]
    return None if callable(getattr(namespace, "func", None)) else "no command"


def test_every_command_shown_parses_with_the_cli() -> None:
    shown, _ = shown_commands()
    assert len(shown) >= MIN_COMMANDS_SHOWN, f"only {len(shown)} bin/callbridge commands found in code blocks"
    problems = [f"{where}\n    {problem}" for where, args in shown if (problem := parse_problem(args))]
    assert not problems, "commands in the docs the CLI refuses:\n" + "\n".join(problems)


def test_no_command_is_shown_without_bin() -> None:
    _, bare = shown_commands()
    assert not bare, "show `bin/callbridge ...` (bare `callbridge` is on PATH only in the venv):\n" + "\n".join(bare)


def test_every_subcommand_has_help_and_is_shown_in_the_docs() -> None:
    paths = list(subcommands(build_parser()))
    assert len(paths) >= 10
    text = "\n".join(path.read_text() for path in doc_files())
    for path in paths:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*path, "--help"])
        assert exit_.value.code == 0 and "usage: callbridge " + " ".join(path) in out.getvalue(), path
        assert re.search(rf"bin/callbridge {re.escape(' '.join(path))}\b", text), f"{path} is shown nowhere"


# --- links and paths ---------------------------------------------------------------------


def test_every_link_between_the_docs_leads_somewhere() -> None:
    broken: list[str] = []
    for path in doc_files():
        for target in LINK.findall(prose(path.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{relative(path)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{relative(path)}: {target} (no such heading in {relative(linked)})")
    assert not broken, "\n".join(broken)


def test_every_repository_path_the_docs_name_exists() -> None:
    missing = [
        f"{relative(path)}: {name}"
        for path in doc_files()
        for code in INLINE_CODE.findall(prose(path.read_text()))
        for name in REPO_PATH.findall(code)
        if code == name and not (ROOT / name).exists()
    ]
    assert not missing, "named in the docs, not in the repository:\n" + "\n".join(missing)
