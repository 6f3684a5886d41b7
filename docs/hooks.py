"""MkDocs hooks: the pages that follow the code are generated at build time, never committed.

Generated pages (added in ``on_files``):

* ``reference/config.md``: every section and field of :class:`sweeps.spec.config.SweepConfig` with its
  type, default, constraints and description (``Field(description=...)``, else the comment on
  the field's line in the source).
* ``reference/cli.md``: the usage and options of every subcommand of
  :func:`sweeps.cli.build_parser`, as ``--help`` prints them.
* ``reference/landscape.md``, ``reference/sweeps.md``: mkdocstrings directives for the public
  names. Griffe reads the source statically and does not see the packages' lazy ``__getattr__``
  exports, so each name is referenced at its defining module, read from ``_EXPORTS``.

``RstRoles``, a griffe extension, shows the docstrings' Sphinx roles as code spans.

Markers in hand-written pages (replaced in ``on_page_markdown``):

* ``<!-- generated: metrics -->``: the table of :data:`landscape.METRICS`.
* ``<!-- generated: modules -->``: every module of ``landscape/`` and ``sweeps/`` with the first
  paragraph of its docstring.
* ``<!-- generated: benchmark-files -->``: the repository's ``benchmarks/*.md`` files, when
  present, their headings demoted one level and their relative links made to resolve.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import griffe
import yaml
from mkdocs.structure.files import File, Files
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
MARKER = "<!-- generated: {} -->"


# --- config reference ---------------------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the ``# comment`` on the line(s) of its declaration in ``cls``'s source."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            found = [comments[i] for i in lines if i in comments]
            if found:
                out[node.target.id] = " ".join(found)
    return out


_BOUNDS = {
    annotated_types.Gt: ("gt", ">"),
    annotated_types.Ge: ("ge", ">="),
    annotated_types.Lt: ("lt", "<"),
    annotated_types.Le: ("le", "<="),
    annotated_types.MinLen: ("min_length", "length >="),
    annotated_types.MaxLen: ("max_length", "length <="),
}


def _constraint(meta: Any) -> str | None:
    """``> 0`` for ``Gt(0)`` and the like; the first docstring line of a validator function."""
    for kind, (attr, symbol) in _BOUNDS.items():
        if isinstance(meta, kind):
            return f"{symbol} {getattr(meta, attr)}"
    func = getattr(meta, "func", None)
    doc = inspect.getdoc(func) if func is not None else None
    return doc.splitlines()[0].rstrip(".") if doc else None


def _describe_type(annotation: Any, constraints: list[str]) -> str:
    """A short type name (``int | None``, ``"sgd" | "adam"``); bounds found on the way go into
    ``constraints``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        constraints += [c for c in map(_constraint, annotation.__metadata__) if c]
        return _describe_type(args[0], constraints)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe_type(a, constraints) for a in args)
    if origin is not None:
        inner = ", ".join(_describe_type(a, constraints) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _yaml(value: Any) -> str:
    """A default as it would be written in the YAML file (flow style, one line)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").strip()


def _cell(text: str) -> str:
    """Text for a table cell: one line, pipes escaped outside code spans (Python-Markdown does not
    split cells at a pipe inside backticks, and would show the backslash)."""
    pieces = text.replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(pieces))


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _markdown(text: str) -> str:
    """reStructuredText roles and double backticks of docstrings as Markdown code spans."""
    return _ROLE.sub(r"`\1`", text).replace("``", "`")


class RstRoles(griffe.Extension):
    """Griffe extension (``extensions:`` in mkdocs.yml): the Sphinx roles of the docstrings,
    ``:func:`lanczos```, shown as code spans in the API reference instead of as written."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)


def _default(field: Any, section: type[BaseModel] | None) -> str:
    """The default as YAML; blank for a section whose default is its fields' defaults (listed
    in its own table)."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return ""
    if section is not None:
        try:
            if value == section():
                return ""
        except ValueError:  # the section has required fields
            pass
    return _cell(f"`{_yaml(value)}`")


def _anchor(key: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", key.lower().replace(".", "-")) or "top-level"


def _sections(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """The table of ``cls``'s fields, then the tables of its nested sections, depth first."""
    comments = _field_comments(cls)
    rows, nested = [], []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        constraints = [c for c in map(_constraint, field.metadata) if c]
        annotation = field.annotation
        type_name = _cell(f"`{_describe_type(annotation, constraints)}`")
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        mapped = next(
            (a for a in typing.get_args(annotation)[1:] if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if section is not None:
            nested.append((section, f"{key}."))
            type_name = f"[section](#{_anchor(key)})"
        elif typing.get_origin(annotation) is dict and mapped is not None:
            nested.append((mapped, f"{key}.<key>."))
            type_name = f"mapping of [{mapped.__name__}](#{_anchor(key + '.key')})"
        description = _markdown(field.description or comments.get(name, ""))
        rows.append(
            f"| `{key}` | {type_name} | {_default(field, section)} | "
            f"{_cell(_markdown(', '.join(constraints)))} | {_cell(description)} |"
        )
    title = prefix.rstrip(".")
    out = [
        f"## `{title or 'top level'}` {{#{_anchor(title.replace('<', '').replace('>', ''))}}}",
        "",
        _markdown(inspect.getdoc(cls) or ""),
        "",
        "| key | type | default | constraint | description |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    for section, section_prefix in nested:
        out += _sections(section, section_prefix)
    return out


def config_reference() -> str:
    from sweeps.spec.config import SweepConfig

    return "\n".join(
        [
            "# Config reference",
            "",
            "Generated from the pydantic schema, `sweeps.spec.config.SweepConfig`, when the site is built: "
            "every section and field with its type, default, constraints and description. Unknown keys "
            "are errors. What the fields do together is explained in the [sweep guide](../guide/sweeps.md).",
            "",
            *_sections(SweepConfig),
        ]
    )


# --- CLI reference -------------------------------------------------------------------------------
def cli_reference() -> str:
    from sweeps.cli import build_parser

    def fixed_width(parser: argparse.ArgumentParser) -> str:
        parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        return parser.format_help()

    parser = build_parser()
    parts = [
        "# CLI reference",
        "",
        "Generated from `sweeps.cli.build_parser()` when the site is built: what `sweeps --help` "
        "and `sweeps COMMAND --help` print. How the commands work together is in the "
        "[sweep guide](../guide/sweeps.md).",
        "",
        "```text",
        fixed_width(parser).rstrip(),
        "```",
        "",
    ]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        parts += [f"## `sweeps {name}`", "", "```text", fixed_width(sub).rstrip(), "```", ""]
    return "\n".join(parts)


# --- Python API reference --------------------------------------------------------------------------
def _by_module(package: str) -> dict[str, list[str]]:
    """Defining module -> public names of ``package``, from its ``_EXPORTS``."""
    exports = importlib.import_module(package)._EXPORTS
    modules: dict[str, list[str]] = {}
    for name, module in exports.items():
        modules.setdefault(package + module, []).append(name)
    return modules


def _directives(modules: dict[str, list[str]]) -> list[str]:
    parts = []
    for module, names in sorted(modules.items()):
        parts += [f"## `{module}`", ""]
        for name in names:
            whole_module = module.rsplit(".", 1)[-1] == name
            parts += [f"::: {module if whole_module else f'{module}.{name}'}", ""]
    return parts


def landscape_api() -> str:
    return "\n".join(
        [
            "# `landscape` API",
            "",
            "Generated from the docstrings. Every name below is importable as `landscape.NAME` (the "
            "package imports it lazily); the headings give the module that defines it.",
            "",
            *_directives(_by_module("landscape")),
        ]
    )


def sweeps_api() -> str:
    modules = _by_module("sweeps")
    modules.setdefault("sweeps.runner", []).append("resume_sweep")
    return "\n".join(
        [
            "# `sweeps` API",
            "",
            "Generated from the docstrings: the names `import sweeps` gives (`sweeps.NAME`), and "
            "`sweeps.runner.resume_sweep`.",
            "",
            *_directives(modules),
        ]
    )


GENERATED_PAGES = {
    "reference/config.md": config_reference,
    "reference/cli.md": cli_reference,
    "reference/landscape.md": landscape_api,
    "reference/sweeps.md": sweeps_api,
}


# --- markers -----------------------------------------------------------------------------------------
def metrics_table() -> str:
    from landscape import METRICS

    rows = [
        f"| `{m.name}` | {m.larger_is} | {_cell(m.description)} | {_cell(m.unit)} | {_cell(m.reference)} |"
        for m in METRICS.values()
    ]
    header = ["| name | larger is | what it is | unit | reference |", "|---|---|---|---|---|"]
    return "\n".join([*header, *rows])


_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _benchmark_images() -> list[Path]:
    suffixes = {".png", ".svg", ".jpg", ".jpeg", ".gif"}
    return [p for p in sorted(BENCHMARKS.rglob("*")) if p.suffix.lower() in suffixes]


def _include_benchmark(path: Path) -> str:
    """One ``benchmarks/*.md`` file for the benchmarks page: headings one level down; relative
    links to images point at the copies this hook adds, other relative links become the
    repository path in code (the site holds no source files)."""

    def link(match: re.Match[str]) -> str:
        bang, text, target = match.groups()
        if re.match(r"[a-z]+:|#", target):
            return match.group(0)
        repo_path = (path.parent / target).resolve().relative_to(ROOT).as_posix()
        if bang:
            return f"![{text}]({repo_path})"
        return f"{text} (`{repo_path}`)"

    out, fenced = [], False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            line = "#" + line if line.startswith("#") else _LINK.sub(link, line)
        out.append(line)
    return "\n".join(out)


def benchmark_files() -> str:
    files = sorted(BENCHMARKS.glob("*.md"))
    if not files:
        return ""
    return "\n\n".join(_include_benchmark(p) for p in files)


def module_table() -> str:
    """Each module of the two packages, subpackages included, with the first paragraph of its
    docstring (read from the source, not imported), so the architecture page lists the modules
    that exist."""
    rows = []
    for package in ("landscape", "sweeps"):
        for path in sorted((ROOT / package).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            summary = " ".join(doc.split("\n\n")[0].split())
            rows.append(f"| `{path.relative_to(ROOT).as_posix()}` | {_cell(_markdown(summary))} |")
    return "\n".join(["| module | what it is |", "|---|---|", *rows])


MARKERS = {"metrics": metrics_table, "benchmark-files": benchmark_files, "modules": module_table}


# --- MkDocs events -------------------------------------------------------------------------------------
def on_files(files: Files, config: Any) -> Files:
    for uri, make in GENERATED_PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    for image in _benchmark_images():
        uri = image.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, content=image.read_bytes()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    for name, make in MARKERS.items():
        if MARKER.format(name) in markdown:
            markdown = markdown.replace(MARKER.format(name), make())
    return markdown
