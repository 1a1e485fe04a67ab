"""The documentation is code: every ```python block of README.md and docs/**/*.md runs (per page, in order, one
namespace, in a temporary directory), and so do the `trp ...` lines of its ```bash blocks. A block preceded by
`<!-- skip: reason -->` is skipped with that reason (the reason is required). Also checked here: the generated
benchmark pages are current (benchmarks/pages.py --check), every relative link resolves, the README stays short
and undated, no file names the project's private notes, every `trp` option is on docs/guides/cli.md, the API
reference lists trp.__all__ and every public name of trp and trp_kernels documents each of its parameters."""
import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# How the docs' `trp ...` lines run: the one place to change if the command's module moves.
TRP_COMMAND = [sys.executable, "-m", "trp"]
CLI_TIMEOUT_S = 300
README_MAX_LINES = 150

FENCE = re.compile(r"^```([\w-]*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:(.*?)-->\s*$")


def pages():
    return [README] + sorted(DOCS.rglob("*.md"))


def blocks(path):
    """[(language, code, first line number, skip reason or None)] of a page's fenced blocks; a skip marker with
    no reason, or one not followed by a block, is an error."""
    lines = path.read_text().splitlines()
    out, i, pending = [], 0, None
    while i < len(lines):
        line = lines[i]
        skip = SKIP.match(line.strip())
        if skip:
            reason = skip.group(1).strip()
            assert reason, f"{path.relative_to(ROOT)}:{i + 1}: `<!-- skip: -->` needs a reason"
            pending = (reason, i + 1)
            i += 1
            continue
        fence = FENCE.match(line)
        if fence and line.startswith("```"):
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            out.append((fence.group(1), "\n".join(lines[i + 1:end]), i + 2, pending[0] if pending else None))
            pending, i = None, end + 1
            continue
        assert pending is None or not line.strip(), \
            f"{path.relative_to(ROOT)}:{pending[1]}: a skip marker must come right before a code block"
        i += 1
    assert pending is None, f"{path.relative_to(ROOT)}:{pending[1]}: a skip marker must come right before a code block"
    return out


def page_id(path):
    return str(path.relative_to(ROOT))


PYTHON_PAGES = [p for p in pages() if any(lang == "python" for lang, *_ in blocks(p))]


def trp_lines(code):
    """The `trp ...` commands of a bash block (comments stripped), as argument lists."""
    return [shlex.split(line, comments=True)[1:] for line in code.splitlines()
            if line.strip().startswith("trp ") and shlex.split(line, comments=True)]


CLI_PAGES = [p for p in pages() if any(lang == "bash" and skip is None and trp_lines(code)
                                       for lang, code, _, skip in blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    ran = 0
    for lang, code, line, skip in blocks(page):
        if lang != "python" or skip is not None:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{page_id(page)}:{line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page_id(page)}, the python block at line {line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        ran += 1
    if not ran:
        pytest.skip("every python block of this page is marked skip")


@pytest.mark.parametrize("page", CLI_PAGES, ids=page_id)
def test_trp_commands_run(page, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    for lang, code, line, skip in blocks(page):
        if lang != "bash" or skip is not None:
            continue
        for args in trp_lines(code):
            proc = subprocess.run(TRP_COMMAND + args, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=CLI_TIMEOUT_S)
            assert proc.returncode == 0, (f"{page_id(page)}, the bash block at line {line}: `trp {shlex.join(args)}` "
                                          f"exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def test_skip_markers_name_a_reason():
    for page in pages():
        blocks(page)  # asserts on markers without a reason or without a block after them


def test_generated_pages_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pages.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_stale_generated_page_fails_the_check(tmp_path, monkeypatch, capsys):
    """pages.py --check on a copy of the tree: current, then a hand-edited page and README block are named, then
    rewritten."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import pages
    for name in ("results", "docs/benchmarks"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(README, tmp_path / "README.md")
    monkeypatch.setattr(pages, "ROOT", tmp_path)
    monkeypatch.setattr(pages, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(pages, "README", tmp_path / "README.md")
    monkeypatch.setattr(pages, "IMAGES", {name: tmp_path / "results" / src.name for name, src in pages.IMAGES.items()})
    assert pages.main(["--check"]) == 0
    page = tmp_path / "docs" / "benchmarks" / "latency.md"
    page.write_text(page.read_text().replace("|", "| 1.23x", 1))
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace(pages.README_END, "a hand-typed line\n" + pages.README_END))
    capsys.readouterr()
    assert pages.main(["--check"]) == 1
    assert capsys.readouterr().out.split() == ["stale:", "docs/benchmarks/latency.md", "(regenerate", "with",
                                               "`python", "benchmarks/pages.py`)", "stale:", "README.md",
                                               "(regenerate", "with", "`python", "benchmarks/pages.py`)"]
    assert pages.main([]) == 0
    assert pages.main(["--check"]) == 0
    assert "a hand-typed line" not in readme.read_text()


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_file_names_the_private_notes():
    names = ["PAPER" + ".md", "DESIGN" + ".md"]  # built here, so that this file does not name them itself
    found = []
    for path in tracked_files():
        if not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)} names {name}" for name in names if name in text]
    assert not found, "\n".join(found)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(path):
    """The page without its fenced blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return INLINE_CODE.sub("", text)


def slug(heading):
    """The anchor mkdocs' toc gives a heading (and GitHub, for the headings used here)."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s]+", "-", text)


def anchors(path):
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*$", path.read_text(), flags=re.M)}


def test_relative_links_resolve():
    broken = []
    for page in pages():
        for target in LINK.findall(prose(page)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page_id(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page_id(page)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_short_and_undated():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    dates = re.findall(r"\b(?:19|20)\d\d-\d\d-\d\d\b|\b\d{1,2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
                       r"[a-z]* (?:19|20)\d\d\b", text)
    assert not dates, f"README.md has date stamps: {dates}"


def test_every_trp_option_is_on_the_cli_page():
    from trp.app import cli
    text = (DOCS / "guides" / "cli.md").read_text()
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = []
    for name, sub in commands.choices.items():
        assert f"`trp {name}" in text, f"docs/guides/cli.md does not describe `trp {name}`"
        for action in sub._actions:
            missing += [f"trp {name} {flag}" for flag in action.option_strings
                        if flag not in ("-h", "--help") and f"`{flag}" not in text]
    assert not missing, "docs/guides/cli.md does not list: " + ", ".join(missing)


def test_the_api_reference_lists_trp_all():
    import trp
    text = (DOCS / "reference" / "trp.md").read_text()
    members = re.search(r"members:\n((?:\s+- \S+\n)+)", text)
    assert members, "docs/reference/trp.md has no members list"
    assert re.findall(r"- (\S+)", members.group(1)) == list(trp.__all__)


def undocumented(obj, label, found):
    """Appends (label, what is missing) for a public griffe object of the API and the public names under it: a
    docstring everywhere, and an Args section naming every parameter of a function, method or constructor."""
    obj = obj.final_target if obj.is_alias else obj
    if obj.is_module:
        for name, member in obj.members.items():
            exported = obj.exports is None or name in obj.exports
            if not name.startswith("_") and exported and (not member.is_alias or obj.exports is not None):
                undocumented(member, f"{label}.{name}", found)
        return
    if not (obj.is_class or obj.is_function):
        return
    if obj.docstring is None:
        found.append((label, "no docstring"))
        return
    signature = obj.members.get("__init__") if obj.is_class else obj
    params = [] if signature is None or signature.is_alias else \
        [p.name for p in signature.parameters if p.name not in ("self", "cls")]
    documented = {p.name.lstrip("*") for s in obj.docstring.parse("google") if s.kind.value == "parameters"
                  for p in s.value}
    missing = [p for p in params if p not in documented]
    if missing:
        found.append((label, "Args lacks " + ", ".join(missing)))
    if obj.is_class:
        for name, member in obj.members.items():
            if not name.startswith("_") and not member.is_alias and member.is_function:
                undocumented(member, f"{label}.{name}", found)


def api_gaps(package):
    griffe = pytest.importorskip("griffe")
    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "python"), str(ROOT)], docstring_parser="google")
    for name in ("trp", "trp_kernels"):
        loader.load(name)
    loader.resolve_aliases(external=False)
    api, found = loader.modules_collection[package], []
    for name in api.exports:
        undocumented(api.members[name], f"{package}.{name}", found)
    return found


@pytest.mark.parametrize("package", ["trp", "trp_kernels"])
def test_every_public_name_documents_its_parameters(package):
    gaps = api_gaps(package)
    assert not gaps, f"{len(gaps)} public names of {package} lack documentation:\n" + \
        "\n".join(f"{label}: {what}" for label, what in gaps)


def test_an_undocumented_parameter_is_found():
    griffe = pytest.importorskip("griffe")
    code = ('def good(a, *, b=1):\n    """Fine.\n\n    Args:\n        a: one.\n        b: two.\n    """\n'
            'def bad(a, b):\n    """Half.\n\n    Args:\n        a: one.\n    """\n'
            'class Bare:\n    def __init__(self, x):\n        pass\n')
    found = []
    fake = griffe.visit("fake", Path("fake.py"), code, docstring_parser=griffe.Parser.google)
    for name, member in fake.members.items():
        undocumented(member, name, found)
    assert found == [("bad", "Args lacks b"), ("Bare", "no docstring")]
