"""`tokenmill generate` prints completions, and reports bad input as an error, not a traceback."""
from server.cli import main


def test_generate_prints_the_completion(tiny_checkpoint, capsys):
    code = main(["generate", str(tiny_checkpoint("qwen2")), "--dtype", "float32", "--max-tokens", "5",
                 "--kv-cache-memory", "4MiB", "--chat", "--prompt", "hello there", "--enforce-eager"])
    out = capsys.readouterr().out
    assert code == 0
    assert "5 generated, finish_reason=length" in out or "finish_reason=stop" in out


def test_missing_model_is_reported_with_exit_code_2(tmp_path, capsys):
    code = main(["generate", str(tmp_path / "absent"), "--prompt", "hi"])
    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_chat_streams_an_answer_per_line_until_end_of_input(tiny_checkpoint, capsys, monkeypatch):
    lines = iter(["hello there", "and again"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code = main(["chat", str(tiny_checkpoint("qwen2")), "--dtype", "float32", "--max-tokens", "6",
                 "--temperature", "0", "--kv-cache-memory", "4MiB"])
    out = capsys.readouterr().out
    assert code == 0
    answers = [line for line in out.split("\n") if line]
    assert len(answers) >= 2  # one streamed answer per user line
