"""Plugins as users install them: entry points found in a real process, not the test's own registry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def write_plugin(site: Path, dist: str, module: str, source: str) -> None:
    """What pip leaves behind for a one-module plugin: the module and its dist-info with the entry point."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[pocketbatch]\n{module} = {module}\n")


GOOD = """
from pocketbatch import Provider, LLMResponse, hookimpl

class Good(Provider):
    name = "good"
    default_model = "g1"
    models = ("g1",)
    async def call_llm_async(self, request):
        return LLMResponse("good", provider="good", model=request.model)

@hookimpl
def register_providers(register):
    register(Good())
"""


def pocketbatch(
    *args, site: Path | None = None, stdin: str | None = None, **env
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("POCKETBATCH_")}
    environ["PYTHONPATH"] = str(site or "")
    environ.update(env)
    return subprocess.run(
        [str(BIN / "pocketbatch"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def provider_names(result: subprocess.CompletedProcess) -> set[str]:
    assert result.returncode == 0, result.stderr
    return {p["name"] for p in json.loads(result.stdout)}


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    return site


def test_pip_installed_plugin_is_listed_with_its_distribution_and_version(site):
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), str(REPO / "examples/plugin")], check=True, timeout=300)
    rows = json.loads(pocketbatch("providers", "--json", site=site).stdout)
    reverse = next(r for r in rows if r["name"] == "reverse")
    assert (reverse["plugin"], reverse["version"]) == ("pocketbatch-reverse", "0.1.0")
    assert "offline" in {r["name"] for r in rows}  # built-ins always load
    used = pocketbatch(
        "run", "-", "-o", "-", "--model", "reverse/reverse-words", site=site, stdin='"one two three"\n'
    )
    assert used.returncode == 0, used.stderr
    assert json.loads(used.stdout)["text"] == "three two one"


def test_allow_list_hides_what_it_does_not_name(site):
    write_plugin(site, "pocketbatch-good", "pb_good", GOOD)
    assert "good" in provider_names(pocketbatch("providers", "--json", site=site))
    hidden = pocketbatch("providers", "--json", site=site, POCKETBATCH_LOAD_PLUGINS="")
    assert provider_names(hidden) == {"offline"}
    named = pocketbatch("providers", "--json", site=site, POCKETBATCH_LOAD_PLUGINS="pocketbatch-good")
    assert "good" in provider_names(named)


def test_a_misspelt_hook_fails_loudly(site):
    write_plugin(
        site, "pocketbatch-typo", "pb_typo", GOOD.replace("def register_providers", "def register_provider")
    )
    result = pocketbatch("providers", site=site)
    assert result.returncode == 2
    assert "pb_typo" in result.stderr and "register_provider" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_plugin_that_fails_to_import_is_named_and_the_others_still_load(site):
    write_plugin(site, "pocketbatch-good", "pb_good", GOOD)
    write_plugin(site, "pocketbatch-broken", "pb_broken", "raise ImportError('needs libfoo')\n")
    result = pocketbatch("providers", "--json", site=site)
    assert "pb_broken" in result.stderr and "needs libfoo" in result.stderr
    assert "plugin pocketbatch-broken 1.2.3 (entry point pb_broken = " in result.stderr
    assert "`pip uninstall pocketbatch-broken` removes it" in result.stderr
    assert {"good", "offline"} <= provider_names(result)
    plugins = json.loads(pocketbatch("plugins", site=site).stdout)
    broken = {"name": "pocketbatch-broken", "version": "1.2.3", "entry_point": "pb_broken"}
    assert {**broken, "error": "ImportError: needs libfoo"} in plugins


def test_trace_plugins_prints_hook_calls(site):
    write_plugin(site, "pocketbatch-good", "pb_good", GOOD)
    result = pocketbatch("providers", "--json", site=site, POCKETBATCH_TRACE_PLUGINS="1")
    assert "register_providers" in result.stderr


ON_LOOP = """
import asyncio
import time

from pocketbatch import LLMResponse, Provider, hookimpl

try:
    asyncio.get_running_loop()
    IMPORTED_ON_A_LOOP = True
except RuntimeError:
    IMPORTED_ON_A_LOOP = False
time.sleep(0.2)  # an SDK that takes its time to import

class Waiting(Provider):
    name = "waiting"
    default_model = "w1"
    async def call_llm_async(self, request):
        return LLMResponse("waited", provider="waiting", model=request.model)

@hookimpl
def register_providers(register):
    register(Waiting())
"""


def python(code: str, site: Path, *, under_pytest: bool) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("POCKETBATCH_")}
    if not under_pytest:
        environ.pop("PYTEST_VERSION", None)  # a user's script: pytest sets it for everything it starts
    environ["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=60
    )


def test_plugins_load_when_pocketbatch_is_imported_not_inside_the_first_flow(site):
    write_plugin(site, "pocketbatch-waiting", "waiting_plugin", ON_LOOP)
    code = (
        "import asyncio, sys\n"
        "import pocketbatch\n"
        "assert 'waiting_plugin' in sys.modules, 'not loaded at import'\n"
        "r = asyncio.run(pocketbatch.call_llm_async('hi', model='waiting/w1'))\n"
        "import waiting_plugin\n"
        "print(waiting_plugin.IMPORTED_ON_A_LOOP, r)\n"
    )
    done = python(code, site, under_pytest=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "waited"]


def test_under_pytest_plugins_stay_lazy_so_a_test_suite_decides_what_loads(site):
    write_plugin(site, "pocketbatch-waiting", "waiting_plugin", ON_LOOP)
    done = python("import sys, pocketbatch; print('waiting_plugin' in sys.modules)", site, under_pytest=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_many_threads_asking_for_a_provider_at_once_all_find_it(site):
    # The first lookups race the one load of the plugins: each thread must wait for it, not see an empty
    # registry ("installed providers: " with nothing after it).
    write_plugin(site, "pocketbatch-waiting", "waiting_plugin", ON_LOOP)
    code = (
        "import asyncio, threading, pocketbatch\n"
        "out, start = [], threading.Barrier(16)\n"
        "def ask(i):\n"
        "    start.wait()\n"
        "    try:\n"
        "        if i % 2:  # sync calls share one loop thread; async ones run each on their own loop\n"
        "            out.append(str(pocketbatch.call_llm('hi', model='waiting/w1')))\n"
        "        else:\n"
        "            out.append(str(asyncio.run(pocketbatch.call_llm_async('hi', model='waiting/w1'))))\n"
        "    except Exception as e:\n"
        "        out.append(repr(e))\n"
        "threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(sorted(set(out)))\n"
    )
    done = python(code, site, under_pytest=True)  # lazy: the threads' first calls load the plugins
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['waited']"


def test_a_plugin_imported_before_pocketbatch_still_registers_its_providers(site):
    # `import pb_good` imports pocketbatch, which loads the plugins, pb_good among them, while pb_good's
    # own import has not finished: its hook is loaded on the first call instead of being lost.
    write_plugin(site, "pocketbatch-good", "pb_good", GOOD)
    script = "import pb_good\nfrom pocketbatch import call_llm\nprint(call_llm('hi', model='good/g1'))\n"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETBATCH_", "PYTEST"))}
    environ["PYTHONPATH"] = str(site)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environ, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "good\n"
