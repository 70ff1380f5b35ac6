"""The READMEs' commands still run: every `tools/*.py` / `benchmarks/*.py` command line shown in
README.md and datasets/README.md names a script that exists and uses only `--options` that the
script's own `--help` lists (per subcommand where the tool has them), and every `make X` they name
is a Makefile target, whose tools/ commands are checked the same way. Options are read from
`--help` in a subprocess, so the check follows the real argparse parsers rather than a copy of them."""
import functools
import glob
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", os.path.join("datasets", "README.md"))
SHELL_FENCES = {"bash", "sh", "shell", "console"}
SCRIPT_RE = re.compile(r"(?<![\w./-])((?:tools|benchmarks)/[\w*.-]+\.(?:py|sh))(?![\w/])")
OPTION_RE = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
MAKE_RE = re.compile(r"(?:^|[\s;&|(])make\s+((?:-\S+\s+)*)([A-Za-z0-9_][\w.-]*)")
CONTROL = {"|", "||", "&&", ";", "&"}


class Snippet(NamedTuple):
    """One command line of a README: `where` is 'README.md:123' (its first line)."""
    where: str
    text: str


def shell_lines(markdown: str, name: str) -> List[Snippet]:
    """The command lines of the shell fences: backslash continuations joined, comment-only lines dropped."""
    out: List[Snippet] = []
    fence: Optional[str] = None
    pending, start = "", 0
    for no, line in enumerate(markdown.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().split(" ")[0].lower()
            pending = ""
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            if not stripped or stripped.startswith("#"):
                continue
            start = no
            if stripped.startswith("$ "):
                stripped = stripped[2:]
        body = stripped
        if body.endswith("\\"):
            pending += body[:-1] + " "
            continue
        out.append(Snippet(f"{name}:{start}", (pending + body).strip()))
        pending = ""
    return out


def inline_spans(markdown: str, name: str) -> List[Snippet]:
    """The `code` spans outside fences (a span may run over a line break inside its paragraph)."""
    out: List[Snippet] = []
    lines = markdown.splitlines()
    in_fence = False
    para: List[Tuple[int, str]] = []

    def flush():
        if not para:
            return
        text = "\n".join(t for _, t in para)
        for m in re.finditer(r"(`+)(.+?)\1", text, re.S):
            no = para[0][0] + text.count("\n", 0, m.start())
            out.append(Snippet(f"{name}:{no}", " ".join(m.group(2).split())))
        para.clear()

    for no, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            flush()
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if not line.strip():
            flush()
        else:
            para.append((no, line))
    flush()
    return out


def readme_snippets() -> List[Snippet]:
    """Every shell-fence command line and inline code span of both READMEs."""
    out: List[Snippet] = []
    for rel in READMES:
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            text = f.read()
        out += shell_lines(text, rel) + inline_spans(text, rel)
    return out


def tokens(text: str) -> List[str]:
    """Shell words without the README's optional-part brackets (`[--seed 0]` -> `--seed`, `0`)."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose-like code: plain words will do
        words = text.split()
    return [w.strip("[]") if w not in CONTROL else w for w in words]


class Invocation(NamedTuple):
    script: str  # as written, e.g. tools/convert_to_coco.py
    args: List[str]  # the words after it, up to a shell control operator


def resolve_script(word: str) -> Optional[str]:
    """`tools/x.py` / `benchmarks/x.py` as written, or a bare `x.py` that one of those folders holds."""
    word = word[2:] if word.startswith("./") else word
    if SCRIPT_RE.fullmatch(word):
        return word
    if re.fullmatch(r"[\w-]+\.py", word):
        for folder in ("tools", "benchmarks"):
            if os.path.isfile(os.path.join(REPO, folder, word)):
                return f"{folder}/{word}"
    return None


def invocations(text: str) -> List[Invocation]:
    """The tools/ and benchmarks/ scripts a command line runs (or names), each with its arguments."""
    words = tokens(text)
    out = []
    for i, w in enumerate(words):
        script = resolve_script(w)
        if script:
            args = []
            for a in words[i + 1:]:
                if a in CONTROL:
                    break
                args.append(a)
            out.append(Invocation(script, args))
    return out


def _help_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), COLUMNS="200",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@functools.lru_cache(maxsize=None)
def help_text(script: str, subcommand: Optional[str] = None) -> str:
    """`python SCRIPT [SUBCOMMAND] --help`, run once per session."""
    cmd = [sys.executable, os.path.join(REPO, script)] + ([subcommand] if subcommand else []) + ["--help"]
    proc = subprocess.run(cmd, cwd=REPO, env=_help_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return proc.stdout


def help_options(text: str) -> FrozenSet[str]:
    """The --option strings of an argparse help, read from its usage (which lists every option the
    parser accepts; descriptions and epilogs may mention other tools' options, so they are not read)."""
    found = set(OPTION_RE.findall(text.partition("\n\n")[0]))
    if re.search(r"^\s+-h, --help\b", text, re.M):  # argparse's own, shown as [-h] in the usage
        found.add("--help")
    return frozenset(found)


def help_subcommands(text: str) -> FrozenSet[str]:
    """The subcommands argparse shows in the usage as `{a,b,c} ...` (empty for a tool without them)."""
    usage = text.partition("\n\n")[0]
    names: Set[str] = set()
    for group in re.findall(r"\{([\w,.-]+)\}\s*\.\.\.", usage):
        names.update(group.split(","))
    return frozenset(names)


def check_invocation(where: str, inv: Invocation) -> List[str]:
    """Problems of one README invocation: missing script, unknown subcommand, unknown --options."""
    if "*" in inv.script:
        if not glob.glob(os.path.join(REPO, inv.script)):
            return [f"{where}: {inv.script} matches no file"]
        return []
    if not os.path.isfile(os.path.join(REPO, inv.script)):
        return [f"{where}: {inv.script} does not exist"]
    if not inv.script.endswith(".py"):
        return []
    top = help_text(inv.script)
    allowed, name = help_options(top), inv.script
    subs = help_subcommands(top)
    problems: List[str] = []
    rest = inv.args
    if subs and inv.args and not inv.args[0].startswith("-") and inv.args[0] != "...":
        sub = inv.args[0]
        if sub not in subs:
            return [f"{where}: {inv.script} has no subcommand {sub!r} (it has {', '.join(sorted(subs))})"]
        allowed, name, rest = help_options(help_text(inv.script, sub)), f"{inv.script} {sub}", inv.args[1:]
    for a in rest:
        if a.startswith("--") and len(a) > 2:
            opt = a.split("=", 1)[0]
            if opt not in allowed:
                problems.append(f"{where}: {name} does not accept {opt} "
                                f"(its --help lists {', '.join(sorted(allowed))})")
    return problems


def makefile_targets() -> FrozenSet[str]:
    """The targets the Makefile defines (rule heads; variable assignments and recipes excluded)."""
    targets: Set[str] = set()
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        for line in f:
            if line.startswith(("\t", "#", " ")):
                continue
            m = re.match(r"([^:=#]+):(?![=:])", line)
            if m:
                targets.update(t for t in m.group(1).split() if not t.startswith("."))
    return frozenset(targets)


def makefile_commands() -> List[Snippet]:
    """The Makefile's recipe lines (continuations joined): what `make X` in the README runs."""
    out: List[Snippet] = []
    pending, start = "", 0
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.startswith("\t") and not pending:
                continue
            body = line.strip()
            start = start if pending else no
            if body.endswith("\\"):
                pending += body[:-1] + " "
                continue
            out.append(Snippet(f"Makefile:{start}", (pending + body).lstrip("@-").strip()))
            pending = ""
    return out


SNIPPETS = readme_snippets()
COMMANDS = [(s, inv) for s in SNIPPETS + makefile_commands() for inv in invocations(s.text)]
PROSE_OPTION_SPANS = [s for s in SNIPPETS if s.text.lstrip("[").startswith("--") and ".py" not in s.text]
MAKE_MENTIONS = [(s, m.group(2)) for s in SNIPPETS for m in MAKE_RE.finditer(s.text.split(" #")[0])]


@pytest.fixture(scope="module")
def readme_tool_options() -> Dict[str, FrozenSet[str]]:
    """Every README script's options (per subcommand, all of them) from its `--help`, run a few at a
    time since most of the ~30 runs wait on imports; returns {'tools/x.py [sub]': options}."""
    scripts = sorted({inv.script for _, inv in COMMANDS
                      if inv.script.endswith(".py") and os.path.isfile(os.path.join(REPO, inv.script))})
    with ThreadPoolExecutor(max_workers=4) as pool:
        tops = dict(zip(scripts, pool.map(help_text, scripts)))
        subs = sorted((script, sub) for script, text in tops.items() for sub in help_subcommands(text))
        sub_texts = dict(zip(subs, pool.map(lambda pair: help_text(*pair), subs)))
    options = {script: help_options(text) for script, text in tops.items()}
    options.update({f"{script} {sub}": help_options(text) for (script, sub), text in sub_texts.items()})
    return options


@pytest.mark.parametrize("snippet,inv", COMMANDS, ids=[f"{s.where}:{inv.script}" for s, inv in COMMANDS])
def test_readme_command_matches_help(readme_tool_options, snippet, inv):
    problems = check_invocation(snippet.where, inv)
    assert not problems, "README command out of date:\n  " + snippet.text + "\n" + "\n".join(problems)


def test_readme_options_in_prose_exist(readme_tool_options):
    """An option the prose names on its own (`--split 0,0,1`, `--val-gt/--val-pred`) is one that some
    README tool still accepts: a renamed or removed option is caught there too."""
    accepted = frozenset().union(*readme_tool_options.values())
    problems = [f"{s.where}: no README tool accepts {opt} (in `{s.text}`)"
                for s in PROSE_OPTION_SPANS for opt in OPTION_RE.findall(s.text) if opt not in accepted]
    assert len(PROSE_OPTION_SPANS) > 50  # README.md alone has about 120
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("snippet,target", MAKE_MENTIONS, ids=[f"{s.where}:make {t}" for s, t in MAKE_MENTIONS])
def test_readme_make_target_exists(snippet, target):
    targets = makefile_targets()
    assert target in targets, (f"{snippet.where}: `make {target}` but the Makefile has no target {target!r} "
                               f"(it has {', '.join(sorted(targets))})")


def test_extraction_sees_the_readme_commands():
    """The extractor reads continued lines, sub-commands, bracketed options and inline spans (else the
    parametrized checks above would pass on nothing)."""
    by_script: Dict[str, List[List[str]]] = {}
    for _, inv in COMMANDS:
        by_script.setdefault(inv.script, []).append(inv.args)
    busi = [a for a in by_script["tools/convert_to_coco.py"] if a[:1] == ["busi"]]
    assert any("--max-size" in a and "--root" in a for a in busi)  # continued over 3 lines, in brackets
    assert any("--dist-url" in a and "--machine-rank" in a for a in by_script["tools/train_net.py"])
    assert ["--budget-s", "600"] in by_script["benchmarks/detector_ablation.py"]  # an inline span
    assert len({inv.script for _, inv in COMMANDS}) >= 20
    assert {"demo", "test", "setup", "train-busi-cpu", "train-mixed-cpu"} <= {t for _, t in MAKE_MENTIONS}
    # the Makefile's train-then-test macro: its --eval-only line is continued onto the overrides
    assert any(s.where.startswith("Makefile:") and "--eval-only" in inv.args and "MODEL.WEIGHTS" in inv.args
               for s, inv in COMMANDS)


def test_extraction_rules_on_a_small_readme():
    md = ("Run `tools/a.py --x 1` or\n`python tools/b.py\n--y`.\n\n"
          "```bash\n# tools/c.py --comment-only\n.venv/bin/python tools/d.py sub --p 1 \\\n"
          "    [--q Q|R] [KEY VALUE ...]   # trailing comment --not-an-option\n"
          "tools/e.py --r && make other\n```\n"
          "```\ntools/f.py --in-a-plain-fence\n```\n")
    spans = [s for s in shell_lines(md, "M") + inline_spans(md, "M")]
    found = {inv.script: (s.where, inv.args) for s in spans for inv in invocations(s.text)}
    assert found == {"tools/a.py": ("M:1", ["--x", "1"]), "tools/b.py": ("M:2", ["--y"]),
                     "tools/d.py": ("M:7", ["sub", "--p", "1", "--q", "Q|R", "KEY", "VALUE", "..."]),
                     "tools/e.py": ("M:9", ["--r"])}
    assert [m.group(2) for s in spans for m in MAKE_RE.finditer(s.text)] == ["other"]


def test_check_names_the_line_and_the_unknown_option():
    """The checker itself: an option of another subcommand, a made-up option and a missing script are
    each reported with the README line; KEY VALUE overrides after train_net's options are not options."""
    assert check_invocation("R:1", Invocation("tools/train_net.py", ["--config-file", "CFG", "--num-gpus", "2",
                                                                    "MODEL.DEVICE", "cpu"])) == []
    bad = check_invocation("R:2", Invocation("tools/train_net.py", ["--config-file", "CFG", "--no-such-flag"]))
    assert len(bad) == 1 and bad[0].startswith("R:2: tools/train_net.py does not accept --no-such-flag")
    # --folds-file belongs to `busbra`, not `busi`: checked per subcommand
    assert check_invocation("R:3", Invocation("tools/convert_to_coco.py", ["busbra", "--folds-file", "f.csv"])) == []
    bad = check_invocation("R:4", Invocation("tools/convert_to_coco.py", ["busi", "--folds-file", "f.csv"]))
    assert len(bad) == 1 and "R:4: tools/convert_to_coco.py busi does not accept --folds-file" in bad[0]
    bad = check_invocation("R:5", Invocation("tools/convert_to_coco.py", ["nosuch", "--root", "x"]))
    assert bad and "has no subcommand 'nosuch'" in bad[0]
    missing = check_invocation("R:6", Invocation("tools/no_such_tool.py", []))
    assert missing == ["R:6: tools/no_such_tool.py does not exist"]


def test_makefile_targets_are_parsed():
    targets = makefile_targets()
    assert {"setup", "test", "demo", "bench", "train-busi-cpu", "train-busi-gpu", "clean-venv"} <= targets
    assert "SHELL" not in targets and "VENV" not in targets and ".PHONY" not in targets
