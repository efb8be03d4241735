"""The docs' code blocks are run, so the docs cannot drift from the code.

Conventions in docs/**/*.md (pages written by others and listed in OTHERS are left alone):

- ```` ```python title="name.py" ````: a complete program, run with the venv's python in a fresh folder
  (offline: no API key, a temporary journal and cache); it must exit 0.
- ```` ```python title="test_name.py" ```` and ```` title="conftest.py" ````: a page's pytest files, run
  together in a fresh project folder (as a user's own project: installed plugins load) twice, so a test
  that only passes once (a journal shared between runs) fails.
- a titled block of any other kind (```` title="prompts.jsonl" ````): a file the programs and commands
  of its page read, written next to them.
- a titled block whose title is a file of this repository (```` title="examples/plugin/pyproject.toml" ````):
  an excerpt; each part between `...` lines must appear in that file as it is.
- a block that is only `--8<-- "path"` lines includes files that are tested where they live.
- ```` ```console ```` blocks: each `$ command` runs (bash, in the page's folder, with the venv's bin
  first on PATH and `examples/` linked in); every line shown after it (except table borders and rows)
  must appear in the command's output, in the same order, once volatile parts are normalized (job ids,
  times, dates). Commands that must not run in tests go in ```` ```bash ```` blocks.
- an untitled ```` ```python ```` block is a fragment; one that looks like a complete program or a test
  file fails this test until it gets a title.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BIN = Path(sys.executable).parent
OTHERS = {"providers/openai.md", "providers/anthropic.md", "rate-limits.md", "benchmarks.md"}

FENCE = re.compile(
    r"^(?P<indent>[ ]*)(?P<ticks>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=ticks)[ ]*$",
    re.M | re.S,
)
TITLE = re.compile(r'title="([^"]+)"')
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')
TABLE_CHARS = set("┃│┏┓┗┛┡┩└┘━─╇╈┳┻┣┫╋═║╔╗╚╝")


@dataclass
class Block:
    page: str
    lang: str
    title: str | None
    body: str
    line: int

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).as_posix() not in OTHERS)


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines()) + "\n"
        info = m.group("info").strip()
        title = TITLE.search(info)
        found.append(
            Block(
                page=page.relative_to(DOCS).as_posix(),
                lang=info.split()[0] if info else "",
                title=title.group(1) if title else None,
                body=body,
                line=text.count("\n", 0, m.start()) + 1,
            )
        )
    return found


ALL = [b for page in pages() for b in blocks(page)]


def is_include(block: Block) -> bool:
    lines = [line for line in block.body.splitlines() if line.strip()]
    return bool(lines) and all(SNIPPET.match(line) for line in lines)


def is_excerpt(block: Block) -> bool:
    return block.title is not None and "/" in block.title and (REPO / block.title).is_file()


def kind(block: Block) -> str:
    if is_include(block):
        return "include"
    if block.lang == "console":
        return "console"
    if block.title is None:
        return "fragment"
    if is_excerpt(block):
        return "excerpt"
    name = Path(block.title).name
    if block.lang == "python" and (name.startswith("test_") or name == "conftest.py"):
        return "pytest"
    if block.lang == "python":
        return "program"
    return "file"


def env_for(folder: Path) -> dict[str, str]:
    """Offline and isolated: no key, no user setting, a journal and caches inside `folder`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POCKETBATCH_")
        and not k.endswith(("_API_KEY", "_BASE_URL"))
        and k not in ("PYTHONPATH", "COLUMNS", "LINES")
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        XDG_CACHE_HOME=str(folder / ".cache"),
        COLUMNS="100",
        PYTHONUNBUFFERED="1",
        NO_MKDOCS_2_WARNING="1",
    )
    return env


def page_folder(tmp_path: Path, page: str) -> Path:
    folder = tmp_path / "page"
    folder.mkdir()
    (folder / "examples").symlink_to(REPO / "examples")
    for b in ALL:
        if b.page == page and kind(b) in ("program", "file"):
            target = folder / b.title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(b.body, encoding="utf-8")
    return folder


# -- includes, excerpts and fragments ------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in ALL if kind(b) == "include"], ids=lambda b: b.where)
def test_included_files_exist(block):
    for line in block.body.splitlines():
        m = SNIPPET.match(line)
        if m:
            path = m.group(1).split(":")[0]
            assert (REPO / path).is_file(), f"{block.where} includes {path}, which does not exist"


@pytest.mark.parametrize("block", [b for b in ALL if kind(b) == "excerpt"], ids=lambda b: b.where)
def test_excerpts_match_their_file(block):
    source = (REPO / block.title).read_text(encoding="utf-8")
    part: list[str] = []
    parts = []
    for line in block.body.splitlines():
        if line.strip() in ("...", "# ..."):
            parts.append(part)
            part = []
        else:
            part.append(line)
    parts.append(part)
    for part in parts:
        text = "\n".join(part).strip("\n")
        if text.strip():
            assert text in source, f"{block.where}: this part is not in {block.title}:\n{text}"


def looks_complete(body: str) -> bool:
    return bool(re.search(r"asyncio\.run\(|__name__ == .__main__.|^(async )?def test_", body, re.M))


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "python"], ids=lambda b: b.where)
def test_complete_programs_are_marked_to_run(block):
    if kind(block) == "fragment":
        assert not looks_complete(block.body), (
            f'{block.where} looks like a complete program or test file: give it a title="name.py" '
            "(or test_name.py) so this test runs it"
        )


def test_the_conventions_are_in_use():
    kinds = {kind(b) for b in ALL}
    assert {"include", "console", "program", "pytest", "excerpt"} <= kinds, kinds


# -- programs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in ALL if kind(b) == "program"], ids=lambda b: b.where)
def test_programs_run(block, tmp_path):
    folder = page_folder(tmp_path, block.page)
    done = subprocess.run(
        [str(BIN / "python"), block.title],
        cwd=folder,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{block.where} ({block.title}) failed:\n{done.stdout}\n{done.stderr}"


# -- pytest files -----------------------------------------------------------------------------------------

DEFAULT_PYPROJECT = """[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""


@pytest.mark.parametrize(
    "page", sorted({b.page for b in ALL if kind(b) == "pytest"}), ids=lambda page: f"docs/{page}"
)
def test_test_files_pass_twice(page, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(DEFAULT_PYPROJECT)
    for b in ALL:
        if b.page == page and kind(b) in ("pytest", "file"):
            (project / Path(b.title).name).write_text(b.body, encoding="utf-8")
    command = [str(BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    for run in ("first", "second"):
        done = subprocess.run(
            command, cwd=project, env=env_for(tmp_path), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (
            f"docs/{page}: tests failed on the {run} run:\n{done.stdout}\n{done.stderr}"
        )


# -- console sessions -------------------------------------------------------------------------------------

VOLATILE = [
    (re.compile(r"\x1b\[[0-9;?]*[A-Za-z]"), ""),
    (re.compile(r"offline-batch-[0-9a-f]{12}"), "offline-batch-<id>"),
    (re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"), "<date>"),
    (re.compile(r"\b1\d{9}\.\d+"), "<timestamp>"),
    (re.compile(r"\b\d+\.\d+ s\b"), "<n> s"),
    (re.compile(r"\b\d+\.\d+x\b"), "<n>x"),
]


def normalize(line: str) -> str:
    for pattern, replacement in VOLATILE:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def shown(line: str) -> bool:
    return bool(line.strip()) and not (set(line) & TABLE_CHARS)


def sessions(block: Block) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for line in block.body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


@pytest.mark.parametrize(
    "page", sorted({b.page for b in ALL if kind(b) == "console"}), ids=lambda page: f"docs/{page}"
)
def test_console_sessions_show_real_output(page, tmp_path):
    folder = page_folder(tmp_path, page)
    env = env_for(tmp_path)
    env["POCKETBATCH_JOURNAL"] = str(tmp_path / "journal.sqlite3")
    env["POCKETBATCH_OFFLINE_DIR"] = str(tmp_path / "offline-batches")
    for block in (b for b in ALL if b.page == page and kind(b) == "console"):
        for command, expected in sessions(block):
            done = subprocess.run(
                ["bash", "-c", f"exec 2>&1\n{command}"],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            actual = [normalize(line) for line in done.stdout.splitlines() if shown(line)]
            position = 0
            for line in (normalize(e) for e in expected if shown(e)):
                try:
                    position = actual.index(line, position) + 1
                except ValueError:
                    pytest.fail(
                        f"{block.where}: `$ {command}` no longer prints (in this order)\n  {line}\n"
                        f"It printed:\n" + "\n".join(actual)
                    )


# -- the README -------------------------------------------------------------------------------------------


def test_the_readme_seed_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (seed,) = [m.group("body") for m in FENCE.finditer(readme) if m.group("info").strip() == "python"]
    driver = (
        "import asyncio\n"
        'shared = {"texts": ["one", "two"]}\n'
        "asyncio.run(flow.run_async(shared))\n"
        'print(shared["summary"])\n'
    )
    (tmp_path / "seed.py").write_text(seed + "\n" + driver, encoding="utf-8")
    done = subprocess.run(
        [str(BIN / "python"), "seed.py"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Summarize: one" in done.stdout and "Summarize: two" in done.stdout
    assert len(seed.strip().splitlines()) <= 20, "the README's example should stay within 20 lines"


def test_every_variable_the_code_reads_is_on_the_configuration_page():
    sources = [*(REPO / "core").rglob("*.py"), *(REPO / "plugins").glob("*/pocketbatch_*/*.py")]
    names = set()
    for source in sources:
        names |= set(re.findall(r"POCKETBATCH_[A-Z0-9_]*[A-Z0-9]", source.read_text(encoding="utf-8")))
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert not missing, f"docs/configuration.md does not document {missing}"
