"""The README's and docs' commands and snippets, run as written (the tiny model, the quick start's app), so they
cannot rot.

Snippets run in a fresh interpreter from a folder outside the checkout: `import cogvideox` must come from the
editable install (`make install` / `make install-dev`), not from the current directory. Nothing is substituted:
the library snippet names "tiny-random", and the client snippet calls the app the quick start starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvideox import CogVideoXPipeline, text
from cogvideox import __main__ as cli
from cogvideox.video import read_mp4
from webapp import launch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOC_PAGES = ("app", "cli", "gpus", "hosting", "security", "benchmarks", "design")
DOCS = README + "".join((ROOT / "docs" / f"{name}.md").read_text() for name in DOC_PAGES)
TINY_VIDEO = (9, 64, 96, 3)  # 9 frames of 96x64: what the snippets ask of the tiny model
QUICK_START_URL = "http://127.0.0.1:7860/"  # where `make demo MODEL=tiny-random` serves the app
REWRITE = "A red fox with a thick winter coat trots across a snowy meadow at dawn, filmed in a slow pan."
# Prints chosen names of a snippet's namespace after running it, as the last line of stdout.
RUNNER = """
import json, runpy, sys
ns = runpy.run_path(sys.argv[1], run_name="__main__")
print("NAMESPACE " + json.dumps({name: ns[name] for name in sys.argv[2:]}, default=repr))
"""


def code_blocks(lang: str, text: str = DOCS) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def python_snippet(marker: str) -> str:
    """The README's first Python block that has `marker`."""
    return next(block for block in code_blocks("python", README) if marker in block)


def shell_commands() -> list[str]:
    """Each command line of the README's and docs' bash blocks, continuation lines joined."""
    lines = "\n".join(code_blocks("bash")).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip()]


def outside_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" or os.environ.get("README_KEEP_PYTHONPATH")
    }
    return {**env, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}  # two cores on CI


def run_outside(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    assert not cwd.resolve().is_relative_to(ROOT)
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=outside_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_snippet(snippet: str, cwd: Path, *names: str) -> tuple[dict, str]:
    (cwd / "snippet.py").write_text(snippet)
    proc = run_outside(["-c", RUNNER, "snippet.py", *names], cwd)
    *output, last = proc.stdout.rstrip("\n").split("\n")
    assert last.startswith("NAMESPACE "), proc.stdout
    return json.loads(last.removeprefix("NAMESPACE ")), "\n".join(output)


# -- installed as the README says ---------------------------------------------------------------------------


def test_the_package_imports_from_outside_the_checkout(tmp_path):
    proc = run_outside(["-c", "import cogvideox; print(cogvideox.__file__)"], tmp_path)
    assert Path(proc.stdout.strip()) == ROOT / "cogvideox" / "__init__.py"  # editable: this checkout


def test_the_stated_python_version_is_the_required_one():
    required = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert f"Python {required[1]}.{required[2]} or newer" in README
    assert sys.version_info >= (int(required[1]), int(required[2]))


# -- the snippets, run --------------------------------------------------------------------------------------


def doc_snippet(marker: str) -> str:
    """The docs' first Python block that has `marker`."""
    return next(block for block in code_blocks("python") if marker in block)


def test_every_python_snippet_is_one_the_tests_run_verbatim():
    blocks = code_blocks("python")
    ran = [python_snippet("CogVideoXPipeline.from_pretrained"), python_snippet("gradio_client")]
    ran.append(doc_snippet("load_lora"))
    assert blocks == ran, "a Python block in the README or docs that no test runs"
    assert '"tiny-random"' in ran[0] and f'Client("{QUICK_START_URL}")' in ran[1]


@pytest.mark.slow
def test_python_snippet_writes_a_video(tmp_path):
    snippet = python_snippet("CogVideoXPipeline.from_pretrained")  # as written: the tiny model, offline
    _, stdout = run_snippet(snippet, tmp_path)
    assert "step 2/2" in stdout  # the callback ran
    assert f"{TINY_VIDEO} uint8" in stdout
    assert read_mp4(tmp_path / "butterfly.mp4").shape == TINY_VIDEO


def test_lora_snippet_runs(tmp_path, monkeypatch, capsys):
    """In this process (the library snippet above checks a fresh one imports the package): as written."""
    import runpy

    (tmp_path / "lora.py").write_text(doc_snippet("load_lora"))
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(tmp_path / "lora.py"), run_name="__main__")
    assert capsys.readouterr().out.splitlines() == ["style", "0.8"]
    assert namespace["pipe"].loras.scales == {} and (tmp_path / "style.safetensors").is_file()


@pytest.fixture(scope="module")
def server(tiny_2b, tmp_path_factory):
    """The app on a free loopback port, as tests/test_app.py serves it (the enhancer answers offline)."""
    import app
    from cogvideox.enhance import PromptEnhancer
    from cogvideox.testing import EchoBackend
    from webapp import serve

    out = tmp_path_factory.mktemp("app") / "outputs"
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(launch.gradio_cache_dir(out)))
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu", dtype=torch.float32)
    enhancer = PromptEnhancer(EchoBackend(REWRITE), lambda prompt: pipe.count_tokens(prompt).n_tokens)
    demo = app.create_demo(pipe, enhancer, output_dir=out, notice=serve.TINY_NOTICE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = launch.parse_args(["--port", str(port), "--output-dir", str(out)])
    demo.launch(**launch.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        yield demo
    finally:
        demo.close()
        env.undo()


@contextlib.contextmanager
def quick_start_app():
    """The app as `make demo MODEL=tiny-random` starts it (`.venv/bin/python app.py --model tiny-random`, from the
    checkout, on its default port), one test at a time on this machine (a lock); skipped if another program holds
    the port."""
    lock = open(Path(os.environ.get("TMPDIR", "/tmp")) / "cogvideox-quick-start.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 7860)) == 0:
                pytest.skip("port 7860, the quick start's, is in use by another program")
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--model", "tiny-random"],
            cwd=ROOT,
            env=outside_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            for line in proc.stdout:  # the app's first line says it is up
                if line.startswith("CogVideoX demo:"):
                    break
            assert proc.poll() is None, "the quick start's app did not start"
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        lock.close()


@pytest.mark.slow
def test_gradio_client_snippet_renders(tmp_path):
    with quick_start_app():
        ns, _ = run_snippet(python_snippet("gradio_client"), tmp_path, "video", "seed", "settings")
    assert read_mp4(ns["video"]).shape == TINY_VIDEO
    assert ns["seed"] == 42 and ns["settings"]["seed"] == 42 and ns["settings"]["num_inference_steps"] == 2


@pytest.mark.slow
def test_the_documented_enhance_call_enhances(server, tmp_path):
    (call,) = re.findall(r"`(client\.predict\([^`]*api_name=\"/enhance\"\))`", DOCS)
    snippet = (
        f"from gradio_client import Client\n\nclient = Client({server.local_url!r})\nenhanced = {call}\n"
    )
    ns, _ = run_snippet(snippet, tmp_path, "enhanced")
    assert ns["enhanced"] == REWRITE


@pytest.mark.slow
def test_tiny_random_command_line_runs_as_written(tmp_path):
    (command,) = [c for c in shell_commands() if "-m cogvideox --model tiny-random" in c]
    argv = shlex.split(command, comments=True)
    assert argv[:3] == [".venv/bin/python", "-m", "cogvideox"]
    run_outside(argv[1:], tmp_path)
    output = Path(argv[argv.index("--output") + 1])
    assert read_mp4(tmp_path / output).shape == TINY_VIDEO
    assert json.loads((tmp_path / output.with_suffix(".json")).read_text())["seed"] == 7


# -- the commands, parsed -----------------------------------------------------------------------------------


def split_commands(line: str) -> list[list[str]]:
    """`a x && b y # note` -> [["a", "x"], ["b", "y"]]."""
    commands, current = [], []
    for token in shlex.split(line, comments=True):
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [argv for argv in [*commands, current] if argv]


def parse_exit(parse, argv) -> str | None:
    """None if `parse(argv)` accepts the arguments, else what argparse said."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parse(argv)
    except SystemExit:
        return stderr.getvalue()
    return None


def test_every_app_and_cli_command_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the README's printf writes users.txt, read by --auth-file
    for name in [n for n in os.environ if n.startswith("COGVIDEOX_")]:
        monkeypatch.delenv(name)
    hf_help = None
    checked = 0
    for line in shell_commands():
        for argv in split_commands(line):
            if argv[0] == "printf":  # sets up a file the next command reads
                subprocess.run(["bash", "-c", line], check=True)
            elif argv[:2] in ([".venv/bin/python", "app.py"], ["python", "app.py"]):
                assert parse_exit(launch.parse_args, argv[2:]) is None, line
                checked += 1
            elif argv[:3] in ([".venv/bin/python", "-m", "cogvideox"], ["python", "-m", "cogvideox"]):
                assert parse_exit(cli.parse_args, argv[3:]) is None, line
                checked += 1
            elif argv[:2] == [".venv/bin/hf", "download"]:
                if hf_help is None:
                    hf = Path(sys.executable).with_name("hf")
                    hf_help = subprocess.run(
                        [hf, "download", "--help"], capture_output=True, text=True
                    ).stdout
                for flag in [a for a in argv if a.startswith("--")]:
                    assert flag in hf_help, f"hf download has no {flag}: {line}"
                checked += 1
    assert checked >= 8


def test_make_commands_name_real_targets_and_variables():
    makefile = (ROOT / "Makefile").read_text()
    spans = [*shell_commands(), *re.findall(r"`(make [^`]+)`", DOCS)]
    commands = [argv for span in spans for argv in split_commands(span) if argv[0] == "make"]
    assert len(commands) >= 4
    for argv in commands:
        for arg in argv[1:]:
            if "=" in arg:
                variable = arg.split("=")[0]
                assert re.search(rf"^{variable} \?=", makefile, re.M), f"the Makefile has no {variable}"
            else:
                assert re.search(rf"^{arg}:", makefile, re.M), f"the Makefile has no target {arg}"


def help_options(parse, monkeypatch) -> set[str]:
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at the terminal's width, inside option names too
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit):
        parse(["--help"])
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", stdout.getvalue())) - {"--help"}


@pytest.mark.parametrize("parse", [launch.parse_args, cli.parse_args], ids=["app", "cli"])
def test_every_option_is_documented(parse, monkeypatch):
    missing = {o for o in help_options(parse, monkeypatch) if not re.search(rf"{o}(?![\w-])", DOCS)}
    assert not missing, f"options not in the README or docs: {sorted(missing)}"


def test_every_environment_variable_of_the_app_is_documented():
    """Every variable app.py and webapp/ read, but those the platform sets (a Space's, ZeroGPU's)."""
    names = set()
    for path in [ROOT / "app.py", *(ROOT / "webapp").glob("*.py")]:
        text = path.read_text()
        names |= set(re.findall(r"COGVIDEOX_[A-Z_]+", text))
        names |= set(re.findall(r"""(?:environ\.get|env)\(\s*["']([A-Z][A-Z_]+)["']""", text))
    names -= {"SPACE_ID", "SPACE_HOST", "SPACES_ZERO_GPU", "GRADIO_TEMP_DIR"}
    assert len(names) > 20 and not {n for n in names if n not in DOCS}, sorted(
        n for n in names if n not in DOCS
    )


def test_no_deprecated_hub_command():
    assert "huggingface-cli" not in DOCS  # replaced by `hf` in huggingface_hub 1.0
    assert shutil.which("hf", path=str(Path(sys.executable).parent))


# -- what the terminal shows ---------------------------------------------------------------------------------


def test_a_local_folder_is_loaded_not_downloaded(tiny_2b, capsys):
    pipe = CogVideoXPipeline.from_pretrained(tiny_2b, device="cpu")
    stages = []
    pipe.load(progress=lambda stage, fraction: stages.append(stage))
    err = capsys.readouterr().err
    assert f"[cogvideox] loading weights from {tiny_2b} (5%)" in err
    assert "download" not in err
    assert "loading weights" in stages and not any(str(tiny_2b) in s for s in stages)  # no path in the page


def test_a_hub_snapshot_without_weights_is_downloaded(tiny_2b, tmp_path, capsys, monkeypatch):
    snapshot = tmp_path / "snapshot"  # what resolve_model leaves before the first load: configs only
    shutil.copytree(tiny_2b, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = CogVideoXPipeline.from_pretrained(snapshot, device="cpu")
    pipe.model_id = "THUDM/CogVideoX-2b"
    fetched = []
    monkeypatch.setattr(
        "cogvideox.pipeline.resolve_model", lambda model, patterns: fetched.append(model) or tiny_2b
    )
    pipe.load()
    err = capsys.readouterr().err
    assert fetched == ["THUDM/CogVideoX-2b"]
    assert "[cogvideox] downloading weights of THUDM/CogVideoX-2b from the Hugging Face Hub (0%)" in err
    assert f"[cogvideox] loading weights from {tiny_2b} (5%)" in err


def test_counting_a_long_prompt_prints_no_tokenizer_warning(tiny_2b):
    tokenizer = text.load_tokenizer(tiny_2b / "tokenizer")  # fresh: transformers warns once per tokenizer
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        prompt = "a red fox trots through fresh snow at dawn " * 60
        assert text.count_tokens(tokenizer, prompt).dropped_tokens > 0
        assert not records, [r.getMessage() for r in records]
        tokenizer(prompt)  # the warning count_tokens avoids, seen by this handler
    finally:
        logger.removeHandler(handler)
    assert any("sequence length is longer" in r.getMessage() for r in records)
