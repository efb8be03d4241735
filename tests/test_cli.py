"""The `pocketbatch` command, through click's runner and as a real process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketbatch.cli import cli, main
from pocketbatch.testing import FakeProvider

BIN = Path(sys.executable).parent / "pocketbatch"


def invoke(*args, input=None):
    """Run the command as main() does (exit codes and one-line errors included)."""
    runner = CliRunner()
    with pytest.raises(SystemExit) as done:
        with runner.isolation(input=input) as (out, err, _):
            sys.argv = ["pocketbatch", *args]
            main()
    return done.value.code, out.getvalue().decode(), err.getvalue().decode()


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_providers_json_lists_the_offline_provider():
    code, out, _ = invoke("providers", "--json")
    offline = next(p for p in json.loads(out) if p["name"] == "offline")
    assert code == 0
    assert offline["key"] == "not needed" and offline["batch"] is True
    assert offline["models"] == ["offline-small", "offline-large"]
    assert offline["prices"] == {"offline-small": [0.15, 0.6], "offline-large": [2.5, 10.0]}
    assert offline["cache_prices"] == {} and offline["prices_date"] is None  # pretend prices, undated


def test_providers_json_shows_each_price_table_and_its_date():
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETBATCH_")}
    done = subprocess.run([str(BIN), "providers", "--json"], env=env, capture_output=True, text=True)
    rows = {p["name"]: p for p in json.loads(done.stdout)}  # a real process loads the installed plugins
    assert rows["anthropic"]["prices_date"] == "2026-11-25" and rows["openai"]["prices_date"] == "2026-12-02"
    assert rows["anthropic"]["prices"]["claude-haiku-4-5"] == [1.0, 5.0]
    assert rows["anthropic"]["cache_prices"]["claude-haiku-4-5"] == [0.1, 1.25, 2.0]  # 1h writes: 2x
    assert rows["openai"]["prices"]["gpt-4o-mini"] == [0.15, 0.6]


def test_providers_table():
    result = CliRunner().invoke(cli, ["providers"])
    assert result.exit_code == 0 and "offline" in result.output


def test_plugins_lists_the_built_in_one():
    code, out, _ = invoke("plugins")
    assert code == 0
    assert {"pocketbatch.default_plugins.offline"} <= {p["name"] for p in json.loads(out) if p.get("builtin")}


def test_run_keeps_input_order_and_ids(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('"first"\n{"id": "x", "prompt": "second", "model": "offline/offline-large"}\n"third"\n')
    code, out, _ = invoke("run", str(src), "-o", "-")
    rows = lines(out)
    assert code == 0
    assert [r["id"] for r in rows] == [1, "x", 3]
    assert ["first" in rows[0]["text"], "second" in rows[1]["text"]] == [True, True]
    assert rows[1]["model"] == "offline/offline-large" and rows[0]["model"] == "offline/offline-small"
    assert set(rows[0]) == {"id", "text", "model", "via", "usage", "cost_usd", "parsed", "error"}
    assert rows[0]["usage"]["input_tokens"] > 0 and rows[0]["error"] is None


def test_one_bad_item_does_not_lose_the_others_and_exits_1(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('"a"\n{"prompt": "b", "max_tokens": 0}\n"c"\n')  # the server refuses max_tokens 0
    out = tmp_path / "out.jsonl"
    code, _, _ = invoke("run", str(src), "-o", str(out))
    rows = lines(out.read_text())
    assert code == 1
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert rows[1]["error"]["type"] == "RequestError" and "max_tokens" in rows[1]["error"]["message"]
    assert rows[1]["text"] is None and rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[1]["model"] == "offline/offline-small"  # the resolved model, even for a failed line


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('"ok"\n{"prompt": 1\n', "line 2: not valid JSON"),
        ('{"promt": "typo"}\n', "line 1: unknown field 'promt'"),
        ("[1, 2]\n", "line 1: expected a JSON string or object"),
        ('{"prompt": ""}\n', 'line 1: "prompt" must be a non-empty string'),
        ('{"prompt": "x", "model": "nope/x"}\n', "line 1: unknown model 'nope/x'"),
        ("\n", "the input has no items"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2_before_any_call(tmp_path, content, says):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    code, _, err = invoke("run", str(src), "-o", str(tmp_path / "out.jsonl"))
    assert code == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_a_missing_key_names_its_variable(tmp_path, register_provider):
    register_provider(FakeProvider("keyed", key_env_var="KEYED_API_KEY"))
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "x", "model": "keyed/m"}\n')
    code, _, err = invoke("run", str(src), "-o", "-")
    assert code == 2 and "set the KEYED_API_KEY environment variable" in err


def test_bad_setting_is_exit_2(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETBATCH_MODE", "sometimes")
    src = tmp_path / "in.jsonl"
    src.write_text('"x"\n')
    code, _, err = invoke("run", str(src), "-o", "-")
    assert code == 2 and "POCKETBATCH_MODE" in err and "Traceback" not in err


def test_real_process_stdin_to_stdout(tmp_path):
    env = {k: v for k, v in os.environ.items()}
    done = subprocess.run(
        [str(BIN), "run", "-", "-o", "-"], input='"hello"\n"world"\n', capture_output=True, text=True,
        env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in lines(done.stdout)] == [1, 2]
    assert "using the offline provider" in done.stderr


def test_usage_error_is_exit_2():
    code, _, err = invoke("run")
    assert code == 2 and "Missing argument" in err


def test_unknown_provider_setting_lists_the_installed_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETBATCH_PROVIDER", "nope")
    src = tmp_path / "in.jsonl"
    src.write_text('"x"\n')
    code, _, err = invoke("run", str(src), "-o", "-")
    assert code == 2 and "unknown provider 'nope'; installed: offline" in err and "Traceback" not in err


def test_a_missing_input_file_is_exit_2(tmp_path):
    code, _, err = invoke("run", str(tmp_path / "absent.jsonl"), "-o", "-")
    assert code == 2 and "absent.jsonl" in err and "No such file" in err
