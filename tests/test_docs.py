"""The documentation stays true: docs/flags.md is what docs/make_flags.py writes, and every flag and repository path
that README.md and docs/*.md name exists (flags in the parser of the script a command line runs)."""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from unittest import mock

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import make_flags  # noqa: E402

DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
# Scripts whose parsers the flags are checked against: the entry scripts, this generator and every benchmark.
SCRIPTS = tuple(dict.fromkeys([*make_flags.SCRIPTS, "docs/make_flags.py",
                               *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("*.py"))]))
# Of the scripts that pass unknown flags on (make_flags.PASSES_ON), those that drop a `--` and pass on what follows.
SEPARATOR_SCRIPTS = ("bench/train_throughput.py", "bench/model_step.py")
# Programs whose flags are their own, in a backticked command such as `tensorboard --logdir runs`.
FOREIGN_PROGRAMS = ("torchrun", "tensorboard", "pip", "make", "git", "bash", "pytest", "ruff")
# The flag the docs use to show the `--flag_name` spelling rule, not a flag of any script.
PLACEHOLDER_FLAGS = frozenset({"--flag-name"})
SHELL_FENCES = ("", "sh", "bash", "shell", "console", "text")
SEPARATORS = (";", "&&", "||", "|", "&", ";;")
Problem = tuple[str, str]  # a word as the document writes it, and what is wrong with it

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)|^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.M)
PYTHON = re.compile(r"python(\d+(\.\d+)?)?")
FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")
# A word's tail that is no part of the path: a test id, a line number, an anchor.
PATH_TAIL = re.compile(r"(::[\w\[\].-]+|:\d+(-\d+)?|#[\w-]*)$")
PLACEHOLDER = re.compile(r"[<>*?{}$~\[\]]|\.\.\.|/path/|://|^/|^-|\s")
GENERATED = ("data", "runs", ".venv")
CHECKED_SUFFIXES = (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".cfg")
BARE_SUFFIXES = (".py", ".sh", ".yaml", ".yml", ".toml")


# ---------------------------------------------------------------------------------------------------------
# The scripts' parsers
# ---------------------------------------------------------------------------------------------------------


class ParserCaught(Exception):
    """Raised in place of parsing, carrying the parser a script built."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def caught_parser(module: ModuleType) -> argparse.ArgumentParser:
    """The parser a script's main() builds, caught when it starts parsing (for scripts with no build_parser)."""
    def catch(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise ParserCaught(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch):
        try:
            module.main()
        except ParserCaught as caught:
            return caught.parser
    raise AssertionError(f"{module.__name__}.main() returned without parsing its flags")


@functools.cache
def script_flags(script: str) -> frozenset[str]:
    """Every option string of a script's parser."""
    module = make_flags.load_script(script)
    parser = module.build_parser() if hasattr(module, "build_parser") else caught_parser(module)
    return frozenset(option for action in parser._actions for option in action.option_strings)


@functools.cache
def all_flags() -> frozenset[str]:
    """The flags of every checked script."""
    return frozenset().union(*map(script_flags, SCRIPTS))


@functools.cache
def repo_names() -> frozenset[str]:
    """The names of the repository's files, outside generated and hidden folders."""
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and (folder != str(ROOT) or d not in GENERATED)]
        names.update(files)
    return frozenset(names)


# ---------------------------------------------------------------------------------------------------------
# Reading markdown
# ---------------------------------------------------------------------------------------------------------


def split_fences(markdown: str) -> tuple[list[tuple[int, str]], str]:
    """The lines of shell code blocks (numbered from 1) and the prose: the text with every code block blanked."""
    code, prose, fence, shell = [], [], None, False
    for number, line in enumerate(markdown.splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence, shell = opened.group(1), opened.group(2).lower() in SHELL_FENCES
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            if shell:
                code.append((number, line))
        else:
            prose.append(line)
            continue
        prose.append("")
    return code, "\n".join(prose)


def logical_lines(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Code lines with continuation lines (a line ending in a backslash runs on) joined, each at its first line."""
    joined: list[tuple[int, str]] = []
    start, parts = 0, []
    for number, line in code:
        start = start or number
        parts.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            joined.append((start, " ".join(parts)))
            start, parts = 0, []
    return joined + ([(start, " ".join(parts))] if parts else [])


def code_spans(prose: str) -> Iterator[tuple[int, str]]:
    """The backticked spans of the prose, each with its line number."""
    for match in CODE_SPAN.finditer(prose):
        yield prose.count("\n", 0, match.start()) + 1, " ".join(match.group(2).split())


def link_targets(prose: str) -> Iterator[tuple[int, str]]:
    """The destinations of the prose's links and link definitions, each with its line number."""
    for match in LINK.finditer(prose):
        yield prose.count("\n", 0, match.start()) + 1, match.group(1) or match.group(2)


# ---------------------------------------------------------------------------------------------------------
# Reading command lines
# ---------------------------------------------------------------------------------------------------------


def shell_words(line: str) -> list[str]:
    """The line's words as the shell splits them, its comment dropped; split at spaces when its quotes don't pair."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:
        return line.split(" #")[0].split()


def simple_commands(words: list[str]) -> list[list[str]]:
    """The words split into the simple commands that ;, &&, || and | separate."""
    commands: list[list[str]] = [[]]
    for word in words:
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def invoked_script(command: list[str], bare: bool = False) -> tuple[str, list[str]] | None:
    """The script a command runs (`python X.py`, `torchrun ... X.py`, and with `bare` `X.py` first) and its arguments;
    None for `python -m` and for other programs."""
    for i, word in enumerate(command):
        name = word.rsplit("/", 1)[-1]
        if PYTHON.fullmatch(name):
            rest = command[i + 1:]
            j = next((j for j, w in enumerate(rest) if not w.startswith("-") or w in ("-m", "-c")), len(rest))
            return (rest[j].removeprefix("./"), rest[j + 1:]) if j < len(rest) and rest[j].endswith(".py") else None
        if name == "torchrun":
            j = next((j for j, w in enumerate(command) if j > i and w.endswith(".py")), None)
            return None if j is None else (command[j].removeprefix("./"), command[j + 1:])
    return (command[0].removeprefix("./"), command[1:]) if bare and command[0].endswith(".py") else None


def flag_name(word: str) -> str | None:
    """The flag a word gives, in the `--flag-name` spelling, or None."""
    name = word.split("=", 1)[0]
    return name.replace("_", "-") if FLAG.fullmatch(name) else None


def given_flags(words: list[str]) -> list[tuple[str, str]]:
    """(the flag as written, in its `--flag-name` spelling) for each word that gives a flag."""
    return [(word.split("=", 1)[0], flag) for word in words if (flag := flag_name(word))]


def command_flag_problems(script: str, args: list[str]) -> list[Problem]:
    """Each flag of a command line that its script would refuse."""
    if not (ROOT / script).is_file():
        return [(script, "no such script")]
    if script not in SCRIPTS:
        return []
    passes_on = make_flags.PASSES_ON.get(script)
    cut = args.index("--") if "--" in args else len(args)
    known = script_flags(script) | (script_flags(passes_on) if passes_on else frozenset()) | PLACEHOLDER_FLAGS
    problems = [(written, f"not a flag of {script}" + (f" nor of {passes_on}" if passes_on else ""))
                for written, flag in given_flags(args[:cut]) if flag not in known]
    for written, flag in given_flags(args[cut + 1:]):
        if script not in SEPARATOR_SCRIPTS:
            problems.append((written, f"after a `--`, which {script} does not take"))
        elif flag not in script_flags(passes_on) | PLACEHOLDER_FLAGS:
            problems.append((written, f"after `--`, not a flag of {passes_on}"))
    return problems


def span_flag_problems(words: list[str]) -> list[Problem]:
    """The flags of a backticked span that do not exist: a command's (`eval.py --split` too) checked against its
    script, the rest against every script's flags (a foreign program's own flags are left alone)."""
    problems = []
    for command in simple_commands(words):
        invoked = invoked_script(command, bare=True)
        if invoked is not None:
            problems += command_flag_problems(*invoked)
        elif command[0].rsplit("/", 1)[-1] not in FOREIGN_PROGRAMS and not PYTHON.fullmatch(command[0]):
            problems += [(written, "not a flag of any script") for written, flag in given_flags(command)
                         if flag not in all_flags() | PLACEHOLDER_FLAGS]
    return problems


# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------


def is_placeholder_part(part: str) -> bool:
    """A path part that stands for a name: OUT, RESULT_DIR, X.md, NAME.yaml."""
    stem = part.split(".")[0]
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", stem)) and ("." not in part or len(stem) == 1 or stem == "NAME")


def path_candidate(word: str) -> str | None:
    """The repository path a word names, or None: not a path, a generated location, or a placeholder."""
    path = PATH_TAIL.sub("", word.rsplit("=", 1)[-1].strip("\"'(),;:")).removeprefix("./")
    parts = [part for part in path.split("/") if part]
    if not parts or PLACEHOLDER.search(path) or parts[0] in GENERATED or any(map(is_placeholder_part, parts)):
        return None
    suffix = PurePosixPath(parts[-1]).suffix
    if "/" in path:
        return path if (ROOT / parts[0]).is_dir() or suffix in CHECKED_SUFFIXES else None
    return path if suffix in BARE_SUFFIXES or re.fullmatch(r"[A-Z][A-Z0-9_-]*\.md", path) else None


def path_exists(path: str) -> bool:
    """A path from the repository root exists; a bare file name, anywhere in the repository."""
    return (ROOT / path).exists() if "/" in path else path in repo_names()


def link_problem(doc: str, target: str) -> str | None:
    """`target: why` when a local link of the document leads nowhere."""
    target = target.split("#")[0].split("?")[0]
    if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):
        return None
    path = os.path.normpath((PurePosixPath(doc).parent / target).as_posix())
    if path.split("/")[0] in GENERATED or PLACEHOLDER.search(path.removeprefix("/")) or (ROOT / path).exists():
        return None
    return f"{target}: the link leads to no file"


# ---------------------------------------------------------------------------------------------------------
# The checks of one document
# ---------------------------------------------------------------------------------------------------------


def line_of(code: list[tuple[int, str]], start: int, word: str) -> int:
    """The first code line from `start` on that holds the word: its own line in a continued command."""
    return next((number for number, line in code if number >= start and word in line), start)


def command_problems(doc: str, markdown: str) -> list[str]:
    """`doc:line: flag: why` for each flag that a code block's command line gives its script and it would refuse."""
    code, _ = split_fences(markdown)
    return [f"{doc}:{line_of(code, number, word)}: {word}: {why}" for number, line in logical_lines(code)
            for command in simple_commands(shell_words(line)) if (invoked := invoked_script(command))
            for word, why in command_flag_problems(*invoked)]


def prose_flag_problems(doc: str, markdown: str) -> list[str]:
    """`doc:line: flag: why` for each backticked flag that no script has (or, in a backticked command, its script)."""
    _, prose = split_fences(markdown)
    return [f"{doc}:{number}: {word}: {why}" for number, span in code_spans(prose)
            for word, why in span_flag_problems(shell_words(span))]


def path_problems(doc: str, markdown: str) -> list[str]:
    """`doc:line: path: why` for each repository path, backticked, in a command line or linked, that is not there."""
    code, prose = split_fences(markdown)
    named = [(line_of(code, number, word), word) for number, line in logical_lines(code) for word in shell_words(line)]
    named += [(number, word) for number, span in code_spans(prose) for word in shell_words(span)]
    problems = [f"{doc}:{number}: {path}: no such file or folder" for number, word in named
                if (path := path_candidate(word)) and not path_exists(path)]
    return problems + [f"{doc}:{number}: {problem}" for number, target in link_targets(prose)
                       if (problem := link_problem(doc, target))]


def read(doc: str) -> str:
    """A document as it is now."""
    return (ROOT / doc).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# The documents
# ---------------------------------------------------------------------------------------------------------


def test_flags_md_is_what_make_flags_writes():
    assert read("docs/flags.md") == make_flags.render(), "docs/flags.md is out of date: run python docs/make_flags.py"


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_command_line_flags_exist_in_their_script(doc: str):
    problems = command_problems(doc, read(doc))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_backticked_flags_exist(doc: str):
    problems = prose_flag_problems(doc, read(doc))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_named_paths_exist(doc: str):
    problems = path_problems(doc, read(doc))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# The checker itself
# ---------------------------------------------------------------------------------------------------------

SNIPPET = """# Title

Run it:

```bash
python train.py --lr 1e-3 \\
    --lr_classifier 1e-2 --made-up-flag 3   # and not --also-made-up, a comment
torchrun --nproc_per_node 4 train.py --amp
python -m pytest --whatever
```

Then `--rerank`, `--no-such-flag`, `tensorboard --logdir runs` and `eval.py --split` or `export.py --rerank`.

```python
print("--not-checked")
```
"""


def test_continuation_lines_join_into_one_command_at_its_first_line():
    code, prose = split_fences(SNIPPET)
    assert logical_lines(code) == [(6, "python train.py --lr 1e-3      --lr_classifier 1e-2 --made-up-flag 3   # and "
                                        "not --also-made-up, a comment"),
                                   (8, "torchrun --nproc_per_node 4 train.py --amp"),
                                   (9, "python -m pytest --whatever")]
    assert len(prose.split("\n")) == len(SNIPPET.splitlines()) and "--not-checked" not in prose


def test_invoked_script_finds_the_script_and_its_arguments():
    assert invoked_script(shell_words("/usr/bin/time -v python -u ./train.py --amp")) == ("train.py", ["--amp"])
    assert invoked_script(shell_words("torchrun --nnodes 2 --rdzv-endpoint HOST:1 train.py --x")) == ("train.py",
                                                                                                     ["--x"])
    assert invoked_script(shell_words("eval.py --split"), bare=True) == ("eval.py", ["--split"])
    assert invoked_script(shell_words("model.py     backbones, autoencoders")) is None
    assert invoked_script(shell_words("python -m pytest tests/test_x.py")) is None
    assert invoked_script(shell_words("make demo")) is None
    assert simple_commands(shell_words("for s in 0 1; do python eval.py --flip; done")) == [
        ["for", "s", "in", "0", "1"], ["do", "python", "eval.py", "--flip"], ["done"]]


def test_command_lines_report_a_made_up_flag_with_document_and_its_own_line():
    assert command_problems("doc.md", SNIPPET) == ["doc.md:7: --made-up-flag: not a flag of train.py"]


def test_flags_passed_on_and_after_a_separator():
    assert command_flag_problems("studies/pairings.py", ["--epochs", "2", "--lr", "1e-3", "--balance=gradnorm"]) == []
    assert command_flag_problems("studies/pairings.py", ["--", "--lr", "1"]) == [
        ("--lr", "after a `--`, which studies/pairings.py does not take")]
    assert command_flag_problems("bench/train_throughput.py", ["--device", "cuda", "--", "--loader", "pil"]) == []
    assert command_flag_problems("bench/train_throughput.py", ["--", "--compile-row"]) == [
        ("--compile-row", "after `--`, not a flag of train.py")]
    assert command_flag_problems("bench/eval_timing.py", ["--passes", "3", "--rerank"]) == []
    assert command_flag_problems("eval.py", ["--backbone_dir", "R", "--no_such=1"]) == [
        ("--no_such", "not a flag of eval.py")]
    assert command_flag_problems("bench/no_such_bench.py", []) == [("bench/no_such_bench.py", "no such script")]


def test_prose_flags_are_checked_against_every_script_and_commands_against_theirs():
    assert prose_flag_problems("doc.md", SNIPPET) == ["doc.md:12: --no-such-flag: not a flag of any script",
                                                      "doc.md:12: --rerank: not a flag of export.py"]


def test_code_spans_and_links_keep_their_line_numbers():
    prose = "a `x`\n\nb ``c ` d`` and\n`e\nf` [g](docs/g.md) `un\n\nclosed"
    assert list(code_spans(prose)) == [(1, "x"), (3, "c ` d"), (4, "e f")]
    assert list(link_targets(prose + "\n[ref]: ../h.md")) == [(5, "docs/g.md"), (8, "../h.md")]


@pytest.mark.parametrize("word, path", [
    ("configs/study.yaml", "configs/study.yaml"), ("model.py", "model.py"), ("bench/", "bench/"),
    ("--config=configs/x.yaml", "configs/x.yaml"), ("tests/test_docs.py::test_x", "tests/test_docs.py"),
    ("README.md", "README.md"), ("scripts/run.sh", "scripts/run.sh"), ("./train.py", "train.py"),
    ("data/prepared", None), ("runs/demo/eval/", None), (".venv/bin/python", None), ("docs/X.md", None),
    ("OUT/budget.json", None), ("<result-dir>/tensorboard", None), ("splits/*.json", None), ("~/datasets", None),
    ("/path/to/Market", None), ("/tmp/x.py", None), ("https://x.org/a.py", None), ("pairings.md", None),
    ("list_train.txt", None), ("0003_c1s1_000002_00.jpg", None), ("splits/", None), ("--out", None),
])
def test_path_candidates(word: str, path: str | None):
    assert path_candidate(word) == path


def test_missing_paths_are_reported_with_document_and_line():
    markdown = ("See `configs/study.yaml`, `model.py`, `runs/x/config.json` and [the flags](flags.md).\n"
                "Not `configs/no_such.yaml`, `no_such_module.py` nor [this](no_such.md#part).\n"
                "```\nbash bench/no_such.sh runs/x   # bench/also_not_checked.sh\n```\n")
    assert path_problems("docs/x.md", markdown) == [
        "docs/x.md:4: bench/no_such.sh: no such file or folder",
        "docs/x.md:2: configs/no_such.yaml: no such file or folder",
        "docs/x.md:2: no_such_module.py: no such file or folder",
        "docs/x.md:2: no_such.md: the link leads to no file"]


def test_make_flags_check_fails_with_one_line_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(make_flags, "FLAGS_MD", tmp_path / "flags.md")
    (tmp_path / "flags.md").write_text("stale\n")
    assert make_flags.main(["--check"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert make_flags.main([]) == 0 and make_flags.main(["--check"]) == 0


def test_md_text_escapes_markup_but_not_words():
    assert make_flags.md_text("a|b  <dir>/*.json\nsnake_case _x") == "a\\|b &lt;dir>/\\*.json snake_case \\_x"
