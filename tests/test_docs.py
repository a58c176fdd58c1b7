"""The documentation points at real things: every relative link in README.md and docs/ resolves (the
file, and the heading an #anchor names), and every command shown in a code block or inline code
exists: `make X` is a target of the Makefile, `python -m MODULE [SUBCOMMAND]` (and the same under
`.venv/bin/python`, `torchrun`, `accelerate launch`) answers `--help`, `circot ...` too when that
console script is installed, and `bench/*.py` scripts are in the repository. The checks are also run
on constructed pages, so that a broken link or an unknown make target is shown to fail them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_LIMIT = 15_000   # bytes: a README a newcomer reads in two minutes

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+((?:-\S+\s+|[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*)([A-Za-z][\w.-]*)")
CIRCOT = re.compile(r"(?:^|[\s;&|(])circot\s+([a-z][\w-]*)")
BENCH = re.compile(r"(?<![\w/.-])bench/\w+\.py\b")
SUBCOMMAND = re.compile(r"^[a-z][a-z-]*$")


# ---- reading pages --------------------------------------------------------------------------------


def split_code(text: str) -> tuple[str, list[str]]:
    """(the prose with code removed, the commands shown: one logical line of a fenced block each, with
    backslash continuations joined, and each inline code span)."""
    snippets = []

    def fenced(m: re.Match) -> str:
        snippets.extend(m.group(2).replace("\\\n", " ").splitlines())
        return "\n" * m.group(0).count("\n")

    prose = FENCE.sub(fenced, text)

    def inline(m: re.Match) -> str:
        snippets.append(m.group(2).replace("\n", " "))
        return " "

    return INLINE.sub(inline, prose), snippets


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file or heading does not exist."""
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    problems = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: link to {target}: {file} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{page.name}: link to {target}: no heading '#{anchor}' in {file.name}")
    return problems


def makefile_targets(makefile: Path = REPO / "Makefile") -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)", makefile.read_text(), re.M))


def make_problems(page: Path, targets: set[str]) -> list[str]:
    """Each `make X` shown on ``page`` whose X is not a target of the Makefile."""
    _, snippets = split_code(page.read_text(encoding="utf-8"))
    return [f"{page.name}: `{s.strip()}`: no make target {m.group(2)!r}"
            for s in snippets for m in MAKE.finditer(s) if m.group(2) not in targets]


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:   # an unbalanced quote in a shortened example
        return line.split()


def module_commands(page: Path) -> set[tuple[str, ...]]:
    """``(module,)`` or ``(module, subcommand)`` of every `python -m MODULE ...` shown on ``page``
    (also behind `.venv/bin/python`, `torchrun`, `accelerate launch`)."""
    _, snippets = split_code(page.read_text(encoding="utf-8"))
    found = set()
    for line in snippets:
        tokens = _tokens(line)
        for i, token in enumerate(tokens):
            launcher = (re.fullmatch(r"(?:\S*/)?python3?(?:\.\d+)?", token) or token == "torchrun"
                        or (token == "launch" and i and tokens[i - 1] == "accelerate"))
            if not launcher:
                continue
            for j in range(i + 1, len(tokens) - 1):
                if tokens[j] in ("|", "&&", ";", "||"):
                    break
                if tokens[j] == "-m":
                    module = tokens[j + 1]
                    if not re.fullmatch(r"[A-Za-z_][\w.]*", module):
                        break
                    nxt = tokens[j + 2] if j + 2 < len(tokens) else ""
                    found.add((module, nxt) if SUBCOMMAND.match(nxt) else (module,))
                    break
    return found


def bench_problems(page: Path) -> list[str]:
    _, snippets = split_code(page.read_text(encoding="utf-8"))
    return [f"{page.name}: {script} does not exist"
            for s in snippets for script in BENCH.findall(s) if not (REPO / script).is_file()]


def answers_help(command: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false",
           "DVC_NO_ANALYTICS": "1"}
    try:
        done = subprocess.run([*command, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False, "no answer within 300 s"
    return done.returncode == 0, (done.stderr or done.stdout).strip()[-500:]


# ---- the repository's pages ---------------------------------------------------------------------


def test_every_relative_link_resolves():
    problems = [p for page in PAGES for p in link_problems(page)]
    assert not problems, "\n".join(problems)


def test_every_make_target_shown_exists():
    targets = makefile_targets()
    assert {"help", "run", "test"} <= targets
    problems = [p for page in PAGES for p in make_problems(page, targets)]
    assert not problems, "\n".join(problems)


def test_every_bench_script_shown_exists():
    problems = [p for page in PAGES for p in bench_problems(page)]
    assert not problems, "\n".join(problems)


def test_every_module_command_shown_answers_help():
    commands = sorted(set().union(*(module_commands(page) for page in PAGES)))
    assert ("orchestration", "run") in commands and ("model_code.model.recipes",) in commands
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: answers_help([sys.executable, "-m", *c]), commands))
    problems = [f"python -m {' '.join(c)} --help: {why}" for c, (ok, why) in zip(commands, results) if not ok]
    assert not problems, "\n".join(problems)


def test_every_circot_command_shown_answers_help():
    found = sorted({m.group(1) for page in PAGES for s in split_code(page.read_text(encoding="utf-8"))[1]
                    for m in CIRCOT.finditer(s)})
    if not found:
        pytest.skip("no `circot ...` command is shown in the documentation")
    exe = shutil.which("circot")
    if exe is None:
        pytest.skip("the circot console script is not installed")
    problems = [f"circot {sub} --help: {why}" for sub in found for ok, why in [answers_help([exe, sub])] if not ok]
    assert not problems, "\n".join(problems)


def test_the_readme_is_short():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move details into docs/ (limit {README_LIMIT})"


# a measured figure in prose: a decimal or grouped number, a share, a duration, a size, a test count
FIGURE = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)+|\d+(?:\.\d+)? ?%|\d+ min(?: \d+ s)?|\d+ (?:passed|skipped)"
                    r"|\d+(?:\.\d+)? ?(?:GB|MB|MiB|ms|s)|\d+ (?:to|-) \d+ minutes)(?![\w.])")
DOC_LINK = re.compile(r"\]\((docs/[^)#\s]+\.md)")


def unsourced_figures(readme: str, root: Path = REPO) -> list[str]:
    """The figures README's prose repeats that no docs page it links states word for word."""
    pages = "\n".join((root / link).read_text(encoding="utf-8") for link in sorted(set(DOC_LINK.findall(readme)))
                      if (root / link).is_file())
    return sorted({f for f in FIGURE.findall(split_code(readme)[0]) if f not in pages})


def test_every_figure_the_readme_repeats_is_stated_on_a_page_it_links():
    """A figure in README (a recall, a duration, a test count, a size) is copied from a docs page README
    links, which says how it was measured; when that page changes, README must change with it."""
    assert unsourced_figures((REPO / "README.md").read_text(encoding="utf-8")) == []


def test_the_figure_check_finds_a_figure_no_linked_page_states(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "run.md").write_text("R@1 0.412 on 500 queries; 11 min 4 s; 457 passed\n")
    ok = "R@1 **0.412**, 457 passed in 11 min 4 s ([run](docs/run.md)); `0.999` in code is not prose"
    assert unsourced_figures(ok, tmp_path) == []
    drifted = ok.replace("0.412", "0.421").replace("11 min 4 s", "10 min 26 s")
    assert unsourced_figures(drifted, tmp_path) == ["0.421", "10 min 26 s"]
    assert unsourced_figures("R@1 0.412 without a link", tmp_path) == ["0.412"]


def test_make_help_is_the_default_goal_and_lists_every_documented_target():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "awk" in dry.stdout and "pip" not in dry.stdout, dry.stdout
    shown = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    documented = re.findall(r"^## .*\n(?:## .*\n)*([A-Za-z0-9][\w.-]*)\s*:", (REPO / "Makefile").read_text(), re.M)
    assert {"help", "run", "test", "serve", "pretrain", "clean"} <= set(documented)
    listed = re.findall(r"^\s+make (\S+)", shown, re.M)
    assert listed == documented and "the linter" in shown


# ---- the checks themselves fail on a broken page ------------------------------------------------


def test_the_checks_find_a_broken_link_an_unknown_target_and_a_missing_script(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## 3. The asset graph\n\n## Twice\n\n## Twice\n")
    good = tmp_path / "good.md"
    good.write_text(
        "# Good\n\nSee [the graph](other.md#3-the-asset-graph), [again](other.md#twice-1), [here](#good), "
        "[a site](https://example.org/x.md) and ![a picture](other.md).\n\n"
        "```bash\nCIRCOT_CIRR_ROOT=/data make run DATASET=cirr   # then make test\n"
        ".venv/bin/python -m orchestration run \\\n  --dataset cirr\n"
        "accelerate launch --num_processes 8 -m model_code.model.recipes --profile gpu\n```\n\n"
        "Inline: `make help`, `python bench/index_scale.py`, `[not a link](nowhere.md)`.\n")
    targets = {"run", "test", "help"}
    assert link_problems(good) == [] and make_problems(good, targets) == [] and bench_problems(good) == []
    assert module_commands(good) == {("orchestration", "run"), ("model_code.model.recipes",)}

    bad = tmp_path / "bad.md"
    bad.write_text("# Bad\n\n[gone](missing.md), [no heading](other.md#no-such-heading), [self](#nope)\n\n"
                   "```bash\nmake deploy\n.venv/bin/python bench/no_such_script.py\n```\n\n"
                   "`make  run-all` and `make run`\n")
    links = link_problems(bad)
    assert len(links) == 3 and "missing.md" in links[0] and "no-such-heading" in links[1] and "#nope" in links[2]
    assert [p.split(": no make target ")[1] for p in make_problems(bad, targets)] == ["'deploy'", "'run-all'"]
    assert bench_problems(bad) == ["bad.md: bench/no_such_script.py does not exist"]


def test_a_module_that_does_not_answer_help_is_reported(tmp_path):
    ok, _ = answers_help([sys.executable, "-m", "orchestration", "models"])
    assert ok
    ok, why = answers_help([sys.executable, "-m", "model_code.no_such_module"])
    assert not ok and "No module named" in why
    ok, _ = answers_help([sys.executable, "-m", "orchestration", "no-such-subcommand"])
    assert not ok
