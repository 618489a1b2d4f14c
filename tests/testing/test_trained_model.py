"""``llmserve make-trained-model``: the corpus split it never trains on, a short run of the tiny preset whose loss
falls and whose checkpoint the engine and transformers run alike, and the cache that reuses only finished runs."""

from __future__ import annotations

import json

import pytest

from llmserve.entrypoints.cli import main
from llmserve.testing import trained_model
from llmserve.testing.tokenizer_files import corpus_text
from llmserve.testing.trained_model import HELD_OUT_FRACTION, PRESETS, corpus_split, trained_model_path
from tests.engine_greedy import assert_matches_hf, engine_greedy


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "tiny"
    assert main(["--log-level", "warning", "make-trained-model", "--preset", "tiny", "--threads", "1",
                 "--output", str(out)]) == 0
    return out


def test_held_out_text_is_the_corpus_end_from_a_paragraph():
    train, held_out = corpus_split()
    assert train + held_out == corpus_text()
    assert train.endswith("\n\n")
    assert HELD_OUT_FRACTION * 0.9 < len(held_out) / len(corpus_text()) < HELD_OUT_FRACTION * 1.5


def test_presets_share_the_tokenizer_and_fit_group_size_128():
    assert PRESETS["draft"].size.vocab_size == PRESETS["target"].size.vocab_size == \
        PRESETS["target-large"].size.vocab_size
    for name in ("target", "target-large", "draft"):
        size = PRESETS[name].size
        assert size.hidden_size % 128 == 0 and size.intermediate_size % 128 == 0
        assert size.max_position_embeddings == PRESETS[name].seq_len


def test_tiny_run_learns_and_is_a_complete_checkpoint(tiny_model):
    report = json.loads((tiny_model / "training.json").read_text())
    losses = [entry["loss"] for entry in report["log"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0
    assert report["held_out_loss"] < losses[0]
    assert report["held_out_tokens"] > 5000 and report["train_tokens"] > 15 * report["held_out_tokens"]
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "training.json"} <= names
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 64


def test_engine_and_transformers_agree_on_the_trained_model(tiny_model):
    assert_matches_hf(engine_greedy(tiny_model, dtype="float32"), tiny_model, tolerance=1e-3)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    from safetensors.torch import load_file

    first, again, other = (load_file(trained_model_path("tiny", steps=2, seed=seed, output=tmp_path / name,
                                                        threads=1) / "model.safetensors")
                           for name, seed in (("first", 0), ("again", 0), ("other", 1)))
    assert all((again[name] == tensor).all() for name, tensor in first.items())
    assert not (other["lm_head.weight"] == first["lm_head.weight"]).all()


def test_cached_run_is_reused_and_an_unfinished_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    runs = []
    real_train = trained_model.train

    def counting_train(folder, preset, seed=0, threads=None, teacher=None):
        runs.append((preset.steps, seed))
        return real_train(folder, preset, seed, threads=1)

    monkeypatch.setattr(trained_model, "train", counting_train)
    path = trained_model_path("tiny", steps=2)
    assert path == tmp_path / "cache" / "models" / "llmserve-trained-tiny-2steps"
    assert trained_model_path("tiny", steps=2) == path and runs == [(2, 0)]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary folder left

    # A folder without the stamp (a run killed before it finished) is trained again.
    (path / ".llmserve-checkpoint.json").unlink()
    assert trained_model_path("tiny", steps=2) == path and runs == [(2, 0), (2, 0)]

    def interrupted(folder, preset, seed=0, threads=None, teacher=None):
        real_train(folder, preset, seed, threads=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(trained_model, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trained_model_path("tiny", steps=3)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def _held_out_kl(teacher, student) -> float:
    """Mean KL(teacher || student) per token over the held-out text's first 255 tokens."""
    import torch
    from transformers import LlamaForCausalLM

    models = [LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval() for path in (teacher, student)]
    ids = torch.tensor([[1] + trained_model._encode(teacher, corpus_split()[1])[:255]])
    with torch.no_grad():
        t, s = (m(input_ids=ids).logits.log_softmax(-1) for m in models)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_a_distilled_model_learns_its_teachers_distributions(tmp_path, monkeypatch):
    """``--distill-from``: the teacher is trained first (cached), the student learns its next-token distributions
    and ends closer to them than the same preset trained on the text's tokens."""
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    student = trained_model_path("tiny", steps=20, seed=1, threads=1, distill_from="tiny")
    models = tmp_path / "cache" / "models"
    assert student == models / "llmserve-trained-tiny-from-tiny-s1-20steps"
    teacher = models / "llmserve-trained-tiny-s1"   # the preset's default steps
    report = json.loads((student / "training.json").read_text())
    assert report["teacher"] == str(teacher) and json.loads((teacher / "training.json").read_text())["teacher"] is None
    assert json.loads((student / ".llmserve-checkpoint.json").read_text())["distilled_from"] == "tiny"
    plain = trained_model_path("tiny", steps=20, seed=1, threads=1)   # the same start and batches, on the tokens
    assert _held_out_kl(teacher, student) < 0.8 * _held_out_kl(teacher, plain)


def test_a_teacher_of_another_vocabulary_is_refused(tmp_path):
    from llmserve.testing.checkpoints import write_checkpoint

    other = write_checkpoint(tmp_path / "other", family="llama", size="tiny")
    with pytest.raises(ValueError, match="vocabulary of 2000 tokens, this preset 4096"):
        trained_model.train(tmp_path / "student", PRESETS["tiny"], threads=1, teacher=other)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        trained_model_path("huge", output=tmp_path)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        trained_model_path("tiny", steps=0, output=tmp_path)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        trained_model_path("tiny", threads=0, output=tmp_path)
