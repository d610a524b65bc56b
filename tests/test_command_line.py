"""What a new user meets first (issue 21): flags that take effect or are refused, the interactive chat
through a real terminal (a pseudo-terminal), the stats line, errors that name flags on the command line
and Python arguments from Python, torchrun's flag errors, --help of every script."""
import argparse
import fcntl
import importlib
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compare_server
import generate
import quant_report
from checkpoints import TINY_VISION_PARAMS
from generate import Sampling, Stats
from inputs import InputError
from model_folders import write_model_folder
from tokenizer import Tokenizer

ROOT = Path(__file__).parents[1]
PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 600}
SYSTEM = "You are {name}, a helpful assistant."
IMG = 10


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny model folder laid out like the official one (SYSTEM_PROMPT.txt included), an image, a
    conversation file."""
    folder = tmp_path_factory.mktemp("Mistral-Small-3.2-24B-Instruct-2506")
    write_model_folder(folder, PARAMS, SYSTEM)
    (folder / "chat.json").write_text(json.dumps([{"role": "user", "content": "Hello there"}]))
    return folder


@pytest.fixture(scope="module")
def tokenizer(repo):
    return Tokenizer.from_file(repo / "tekken.json")


def short(repo, *flags) -> list[str]:
    return ["--model", str(repo), "--max-tokens", "2", "--temperature", "0", "--dtype", "float32", *flags]


def dumped_prompt(path: Path, tokenizer) -> tuple[list[int], str]:
    ids = load_file(str(path))["prompt_ids"].tolist()
    return ids, tokenizer.decode(ids)


# ----------------------------------------------------------------------------- 1. every flag takes effect or is refused

def test_messages_take_the_prompt_the_image_and_the_system_prompt(repo, tokenizer, tmp_path):
    """--messages with --system, --image and a prompt: the prompt and its image continue the conversation
    and --system opens it (they were dropped: the same 38 tokens as --messages alone)."""
    dump = tmp_path / "d.safetensors"
    alone = tmp_path / "alone.safetensors"
    assert generate.main(short(repo, "--messages", str(repo / "chat.json"), "--dump", str(alone))) == 0
    assert generate.main(short(repo, "--messages", str(repo / "chat.json"), "--system", "Be brief", "--image",
                               str(repo / "photo.png"), "--dump", str(dump), "EXTRA")) == 0
    ids, text = dumped_prompt(dump, tokenizer)
    alone_ids, alone_text = dumped_prompt(alone, tokenizer)
    assert "Be brief" in text and "Hello there" in text and "EXTRA" in text and IMG in ids
    assert "EXTRA" not in alone_text and "Be brief" not in alone_text and IMG not in alone_ids   # control


@pytest.mark.parametrize("flags, message", [
    (lambda repo, chat: ["--messages", str(repo / "chat.json"), "--image", str(repo / "photo.png")],
     "--image with --messages goes with a prompt"),
    (lambda repo, chat: ["--messages", str(chat), "--system", "Be brief"], "--system and the system message of"),
    (lambda repo, chat: ["--mmproj", "F16", "hi"], "--mmproj F16: only a GGUF model takes an mmproj"),
])
def test_combinations_that_cannot_take_effect_are_refused(repo, tmp_path, monkeypatch, capsys, flags, message):
    chat = tmp_path / "with_system.json"
    chat.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]))
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    try:
        code = generate.main(short(repo, *flags(repo, chat)))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("error:") == 1, err


def test_other_commands_refuse_flags_they_would_ignore(repo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        quant_report.main(["score", "--model", str(repo), "--reference", "r.safetensors", "--text", "t.txt"])
    assert exit.value.code == 2 and "score does not take --text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        compare_server.main(["http://127.0.0.1:9", "--model", str(repo), "--messages", "m.json", "--prompt", "hi"])
    assert exit.value.code == 2 and "--messages and --prompt cannot be combined" in capsys.readouterr().err


def test_interactive_answers_the_prompt_and_takes_the_image(repo, tokenizer, interactive_session):
    """-i "FIRST" answers FIRST, then the chat goes on; -i --image X sends X with the first message
    typed (both were dropped)."""
    prompts = interactive_session(["And then?"])
    assert generate.main(short(repo, "-i", "FIRST")) == 0
    assert len(prompts) == 2 and "FIRST" in tokenizer.decode(prompts[0])
    assert prompts[1][:len(prompts[0])] == prompts[0]
    prompts = interactive_session(["Look", "And this?"])
    assert generate.main(short(repo, "-i", "--image", str(repo / "photo.png"))) == 0
    assert IMG in prompts[0] and prompts[1].count(IMG) == prompts[0].count(IMG)   # the first message only


# ----------------------------------------------------------------------------- 2. the interactive chat, in a terminal

def read_until(fd: int, pattern: bytes, seconds: float = 60) -> bytes:
    """The terminal's output up to and including the first match of the regex `pattern`."""
    seen, deadline = b"", time.monotonic() + seconds
    while not re.search(pattern, seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} within {seconds} s; the terminal shows {seen[-1500:]!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:   # EIO: the program closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the program ended before {pattern!r}; the terminal shows {seen[-1500:]!r}")
            seen += chunk
    return seen


ANSWERED = rb"GB\]\r?\n(\r?\n)?> $"        # the stats line, then the next prompt


@pytest.fixture
def terminal(repo, tmp_path):
    """generate.py -i in a pseudo-terminal: (fd to type on and read from, the process, its dump file)."""
    primary, secondary = os.openpty()
    dump = tmp_path / "turn.safetensors"
    # A session of its own whose controlling terminal is the pseudo-terminal, so that Ctrl-C there is a
    # SIGINT, which the program must not inherit ignored (as a background job of a shell does).
    def controlling_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *short(repo, "-i", "--dump", str(dump))],
                            stdin=secondary, stdout=secondary, stderr=secondary, cwd=ROOT, close_fds=True,
                            env={**os.environ, "TERM": "xterm"}, start_new_session=True,
                            preexec_fn=controlling_terminal)
    os.close(secondary)
    try:
        yield primary, proc, dump
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(primary)


def test_the_chat_in_a_terminal(terminal, tokenizer):
    """Through a real terminal: arrow keys edit the line and recall the last one, /help, /image checked
    when typed, /reset, Ctrl-C at the prompt does not leave, Ctrl-D does."""
    fd, proc, dump = terminal
    read_until(fd, rb"> $", 120)                                   # started: the first prompt
    os.write(fd, b"Helo\x1b[Dl\r")                                 # Helo, left arrow, l: Hello
    read_until(fd, ANSWERED)
    _, text = dumped_prompt(dump, tokenizer)
    assert text.endswith("Hello") and "\x1b" not in text and "[D" not in text, repr(text)

    os.write(fd, b"\x1b[A\r")                                      # up arrow: Hello again
    read_until(fd, ANSWERED)
    _, text = dumped_prompt(dump, tokenizer)
    assert text.count("Hello") == 2 and "[A" not in text, repr(text)

    os.write(fd, b"/help\r")
    assert b"/reset" in read_until(fd, rb"/exit.*\n(.*\n)*\r?\n> $")
    os.write(fd, b"/image /no/such/photo.png\r")                   # reported now, not with the next message
    assert b"no such file" in read_until(fd, rb"not attached\)\r?\n(\r?\n)?> $", 20)

    os.write(fd, b"/reset\r")
    read_until(fd, rb"new conversation.*\r?\n(\r?\n)?> $")
    os.write(fd, b"Again\r")
    read_until(fd, ANSWERED)
    ids, text = dumped_prompt(dump, tokenizer)
    assert text.endswith("Again") and "Hello" not in text and IMG not in ids, repr(text)   # a new conversation

    # Ctrl-C at the prompt: still here. (A SIGINT that lands just before readline waits for input is
    # only seen with the next key, CPython's readline loop: pressed again after a while, as a person would.)
    for _ in range(5):
        os.write(fd, b"\x03")
        try:
            read_until(fd, rb"Ctrl-D or /exit leaves.*\r?\n(\r?\n)?> $", 5)
            break
        except AssertionError:
            assert proc.poll() is None, "Ctrl-C at the prompt ended the chat"
    else:
        pytest.fail("Ctrl-C at the prompt: no answer")
    os.write(fd, b"\x04")                                          # Ctrl-D: the end
    assert proc.wait(timeout=30) == 0


def test_chat_commands(repo, tokenizer, interactive_session, capsys):
    """/exit leaves (it was sent to the model); an unknown command is not sent; a message that starts with
    '/' after a space is."""
    prompts = interactive_session(["/nope", " /usr is a folder", "/exit", "never sent"])
    assert generate.main(short(repo, "-i")) == 0
    assert "unknown command /nope" in capsys.readouterr().err
    assert len(prompts) == 1 and "/usr is a folder" in tokenizer.decode(prompts[0])


# ----------------------------------------------------------------------------- 4. the stats line and --compile

def test_slow_decoding_reads_in_seconds_per_token(capsys):
    generate.print_stats(Stats(prompt_tokens=5, generated_tokens=3, prefill_s=2.0, decode_s=30.0), torch.device("cpu"))
    line = capsys.readouterr().err
    assert "decode 15.0 s/token" in line and "prefill 2.5 tok/s" in line, line
    generate.print_stats(Stats(prompt_tokens=5, generated_tokens=3, prefill_s=2.0, decode_s=0.5), torch.device("cpu"))
    assert "decode 4.0 tok/s" in capsys.readouterr().err                          # control: fast enough for tok/s


def test_peak_memory_converts_kib(monkeypatch):
    """ru_maxrss is in KiB on Linux: 1,000,000 KiB is 1.024 GB (it read 1.00)."""
    real = resource.getrusage
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(resource, "getrusage", lambda who: type("R", (), {"ru_maxrss": 1_000_000})() if
                        who == resource.RUSAGE_SELF else real(who))
    assert generate.peak_memory_gb(torch.device("cpu")) == pytest.approx(1.024)


def slow_first_step(monkeypatch, seconds: float):
    """compile=True steps through decode_step, the first call taking `seconds` longer, as compiling does."""
    calls = []

    def step(*args):
        if not calls:
            time.sleep(seconds)
        calls.append(1)
        return generate.decode_step(*args)
    monkeypatch.setattr(generate, "compiled_decode_step", lambda device_type: step)


def test_compiling_is_not_decoding(repo, monkeypatch, capsys):
    """The first compiled step (compiling it) is timed apart: not in the decode figure; the command
    line says it compiles. Control: without compile the slow step would be decoding."""
    from load import load_model
    model = load_model(repo, dtype=torch.float32)
    slow_first_step(monkeypatch, 1.5)
    stats = [s.stats for s in generate.stream(model, [1, 3, 1000, 4], [], 6, Sampling(0.0), set(), compile=True)][-1]
    assert stats.decode_s < 1.0 and stats.compile_s >= 1.5 and stats.decode_steps == 4, stats
    slow_first_step(monkeypatch, 1.5)
    assert generate.main(short(repo, "--compile", "--max-tokens", "6", "hi")) == 0
    err = capsys.readouterr().err
    assert "compiling the decoding step...\n" in err and re.search(r"compiling the decoding step 1\.\d s", err), err
    decode = re.search(r"decode (\S+) (tok/s|s/token)", err)
    assert decode[2] == "tok/s" and float(decode[1]) > 4 / 1.0, err      # 4 steps, none of them compiling

    slow_first_step(monkeypatch, 1.5)
    plain = [s.stats for s in generate.stream(model, [1, 3, 1000, 4], [], 6, Sampling(0.0), set())][-1]
    assert plain.compile_s == 0 and plain.decode_steps == 5                    # eager: every step decodes


# ----------------------------------------------------------------------------- 6. errors name flags or arguments

def test_errors_name_python_arguments_from_python_and_flags_from_the_command_line(repo, tmp_path, capsys):
    missing = tmp_path / "p.gguf"
    (tmp_path / "m.gguf").touch()
    for kwargs, python, flag in [
            ({"model": "./no/such/folder"}, "model=./no/such/folder: no such folder", "--model ./no/such/folder:"),
            ({"model": str(tmp_path / "m.gguf"), "mmproj": str(missing)}, f"mmproj={missing}: no such file",
             f"--mmproj {missing}: no such file"),
            ({"model": str(repo), "mmproj": "F16"}, "mmproj=F16: only a GGUF model takes an mmproj",
             "--mmproj F16: only a GGUF model takes an mmproj")]:
        with pytest.raises(InputError) as error:
            generate.Session(**kwargs)
        assert python in str(error.value) and "--" not in str(error.value), error.value
        assert generate.main([a for k, v in kwargs.items() for a in (f"--{k}", v)] + ["hi"]) == 2
        err = capsys.readouterr().err
        assert flag in err and "model=" not in err and "mmproj=" not in err, err


def test_as_flags():
    parser = argparse.ArgumentParser()
    for flag in ("--mmproj", "--model", "--max-tokens"):
        parser.add_argument(flag)
    assert generate.as_flags(parser, "x: an mmproj goes in mmproj=)") == "x: an mmproj goes in --mmproj)"
    assert generate.as_flags(parser, "model=a/b: no such folder; pass max_tokens=4") == \
        "--model a/b: no such folder; pass --max-tokens 4"
    assert generate.as_flags(parser, "device='tpu': see https://x/?model=1") == "device='tpu': see https://x/?model=1"


# ----------------------------------------------------------------------------- 7. Session from Python: the CLI's defaults

def test_session_answer_opens_with_the_system_prompt_as_the_cli_does(repo, tmp_path):
    session = generate.Session(str(repo), device="cpu", dtype="float32")
    hello = [{"role": "user", "content": "Hello"}]
    reply = session.answer(hello, sampling=Sampling(0.0, max_tokens=2))
    dump = tmp_path / "cli.safetensors"
    assert generate.main(short(repo, "--dump", str(dump), "Hello")) == 0
    assert reply.prompt_ids == load_file(str(dump))["prompt_ids"].tolist()
    filled = SYSTEM.replace("{name}", repo.name)
    assert session.system_prompt == filled and session.sampling == generate.card_defaults(repo.name)
    own = session.answer([{"role": "system", "content": "Be brief."}] + hello, sampling=Sampling(0.0, max_tokens=2))
    assert own.prompt_ids != reply.prompt_ids                                   # a system message of its own wins
    session.system_prompt = None
    bare = session.answer(hello, sampling=Sampling(0.0, max_tokens=2))
    assert len(bare.prompt_ids) < len(reply.prompt_ids)                          # and None leaves it out


# ----------------------------------------------------------------------------- 8. torchrun: one error, before the process group

@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_a_bad_flag_is_one_error_from_rank_0(repo, monkeypatch, capsys, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("the process group was made for bad input"))
    with pytest.raises(SystemExit) as exit:
        generate.main(["--model", str(repo), "--device", "cpu", "--top-p", "2", "hi"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.count("error: --top-p 2.0") == (1 if rank == 0 else 0) and (rank == 0 or err == ""), err
    assert generate.main(["--model", str(repo / "missing"), "--device", "cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == (1 if rank == 0 else 0) and (rank == 0 or err == ""), err


# ----------------------------------------------------------------------------- 10. every script takes --help

SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py"),
                                                          ROOT / "docs" / "flags.py"]
                 if '__name__ == "__main__"' in p.read_text())


def test_the_scripts_are_found():
    assert {"generate.py", "serve.py", "benchmarks/bench_gguf.py", "benchmarks/bench_tokenizer.py",
            "docs/flags.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_help_without_running(script, monkeypatch, capsys):
    path = ROOT / script
    assert "parse_args(" in path.read_text(), f"{script} reads no flags: --help would run it"
    monkeypatch.syspath_prepend(str(path.parent))
    module = importlib.import_module(path.stem)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit:
        module.main()
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith("usage:"), out[:200]


def test_a_benchmark_answers_help_at_once():
    """The script itself, as a user runs it: usage, not 3 minutes of benchmark."""
    run = subprocess.run([sys.executable, "benchmarks/bench_gguf.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage:") and "threads" not in run.stdout.split("\n")[-2]
