"""`chatforge export --format hf`: transformers loads the folder offline and computes what chatforge does."""

import pytest
import torch

from chatforge.chat_format import Message, render
from chatforge.checkpoint import load_model, save_checkpoint
from chatforge.engine import SamplingParams, generate
from chatforge.model import with_head
from chatforge.reward import score_sequences

from conftest import assert_one_line_error, run_cli

transformers = pytest.importorskip("transformers")


def test_an_exported_language_model_reads_tokens_and_decodes_as_chatforge_does(chat_model, tmp_path):
    out = tmp_path / "hf"
    run_cli("export", chat_model, out, "--format", "hf")
    model, tokenizer, _ = load_model(chat_model)
    model.eval()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)

    text = "The for statement"
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    assert hf_tokenizer(text).input_ids == ids  # plain text gets <|bos|> first, as chatforge reads it
    messages = [Message("system", "Be brief."), Message("user", "What is a tuple?")]
    rendered = hf_tokenizer.apply_chat_template([m.to_dict() for m in messages], add_generation_prompt=True)
    assert list(getattr(rendered, "input_ids", rendered)) == render(messages, tokenizer, add_generation_prompt=True)

    with torch.no_grad():
        assert torch.allclose(hf_model(torch.tensor([ids])).logits, model(torch.tensor([ids])), atol=1e-4)
        stops = (tokenizer.end_id, tokenizer.eos_id, tokenizer.bos_id)
        ours = generate(model, ids, SamplingParams(max_new_tokens=24, temperature=0), stop_ids=stops)
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert theirs == ours


def test_an_exported_reward_model_scores_as_chatforge_does_before_its_offset(pretrained, tmp_path):
    base, tokenizer, _ = load_model(pretrained)
    torch.manual_seed(0)
    reward_model = with_head(base, "scalar")
    torch.nn.init.normal_(reward_model.score.weight, std=0.5)
    reward_model.config.score_offset = 0.25
    save_checkpoint(tmp_path / "rm", reward_model, tokenizer)
    run_cli("export", tmp_path / "rm", tmp_path / "hf")
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", local_files_only=True)
    sequences = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in ("A list is mutable.", "A tuple")]
    ours = score_sequences(reward_model.eval(), sequences, tokenizer.pad_id)
    with torch.no_grad():
        theirs = [hf_model.eval()(torch.tensor([s])).logits[0, 0].item() for s in sequences]
    assert theirs == pytest.approx([score + 0.25 for score in ours], abs=1e-4)


def test_export_never_replaces_a_folder_of_other_files(chat_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("export", chat_model, tmp_path, check=False), "a folder with other files in it")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("precision, tolerance", [("f32", 1e-5), ("f16", 1e-3), ("q8_0", 1e-2)])
def test_a_gguf_export_loads_in_transformers_and_back_in_chatforge(chat_model, tmp_path, precision, tolerance):
    """transformers' own GGUF loader reads the file (tokenizer, template, llama.cpp's Q/K order) and computes
    chatforge's logits, to the precision's rounding; `chatforge import` reads it back."""
    pytest.importorskip("gguf")
    out = tmp_path / f"model-{precision}.gguf"
    run_cli("export", chat_model, out, "--format", "gguf", "--precision", precision)
    model, tokenizer, _ = load_model(chat_model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    messages = [Message("user", "What is a tuple? 2024")]
    rendered = reference_tokenizer.apply_chat_template([m.to_dict() for m in messages], add_generation_prompt=True)
    ids = render(messages, tokenizer, add_generation_prompt=True)
    assert list(getattr(rendered, "input_ids", rendered)) == ids
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids]))
        assert (reference(torch.tensor([ids])).logits - ours).abs().max() < tolerance * ours.abs().max()
        run_cli("import", out, tmp_path / "back")
        back, back_tokenizer, _ = load_model(tmp_path / "back")
        assert (back.eval()(torch.tensor([ids])) - ours).abs().max() < tolerance * ours.abs().max()
    assert render(messages, back_tokenizer, add_generation_prompt=True) == ids
