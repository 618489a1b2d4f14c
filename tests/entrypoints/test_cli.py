"""The ``llmserve`` command line: make-checkpoint, generate, and clear errors."""

from __future__ import annotations

from llmserve.entrypoints.cli import main


def test_make_checkpoint_then_generate(tmp_path, capsys):
    out_dir = tmp_path / "qwen3"
    assert main(["make-checkpoint", "--family", "qwen3", "--size", "tiny", "--output", str(out_dir)]) == 0
    assert (out_dir / "config.json").is_file()
    capsys.readouterr()
    code = main(["--log-level", "warning", "generate", str(out_dir), "--kv-cache-memory-bytes", "8MiB",
                 "--prompt", "Hello", "--prompt", "World", "--max-tokens", "5", "--ignore-eos"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("--- prompt") == 2
    assert "(length, 5 tokens)" in printed


def test_generate_on_a_missing_model_exits_2_with_a_message(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_engine_flag_value_exits_2(tmp_path, capsys, llama_dir):
    assert main(["generate", str(llama_dir), "--block-size", "0", "--prompt", "x"]) == 2
    assert "--block-size" in capsys.readouterr().err


def test_logging_flags_work_before_and_after_the_command():
    """``llmserve serve MODEL --log-level debug`` as README lists them among the command's flags; a value after
    the command wins, and none leaves the one before it (or the default)."""
    from llmserve.entrypoints.cli import build_parser

    parser = build_parser()
    for argv, expected in ((["serve", "m", "--log-level", "debug", "--log-format", "json"], ("debug", "json")),
                           (["--log-level", "warning", "serve", "m"], ("warning", "text")),
                           (["--log-level", "warning", "bench", "latency", "m", "--log-level", "error"],
                            ("error", "text")),
                           (["generate", "m"], ("info", "text"))):
        args = parser.parse_args(argv)
        assert (args.log_level, args.log_format) == expected, argv


def test_generate_with_a_lora_adapter_and_the_flags_it_needs(llama_dir, checkpoint_dir, tmp_path, capsys):
    from llmserve.testing.lora_adapters import write_lora_adapter

    adapter = write_lora_adapter(tmp_path / "adapter", checkpoint_dir("llama"))
    base = ["generate", str(llama_dir), "--kv-cache-memory-bytes", "8MiB", "--prompt", "Hello", "--max-tokens", "4",
            "--ignore-eos"]
    assert main([*base, "--enable-lora", "--lora", str(adapter)]) == 0
    assert "(length, 4 tokens)" in capsys.readouterr().out
    assert main([*base, "--lora", str(adapter)]) == 2
    assert "--lora needs --enable-lora" in capsys.readouterr().err
    assert main([*base, "--enable-lora"]) == 2
    assert "name it with --lora PATH" in capsys.readouterr().err
