"""LoRA through peft: only the adapters train, every path (training, prefill, the engine's decoding, merge and
export) computes with them, and a LoRA run's small checkpoints stand on a base they check by hash."""

import json
import shutil

import pytest
import torch

from chatforge.checkpoint import ADAPTER_FILE, WEIGHTS_FILE, load_model, save_checkpoint
from chatforge.engine import SamplingParams, generate_batch
from chatforge.lora import adapters_disabled, has_adapters, merge_adapters
from chatforge.sft import resolve_config, sft
from chatforge.train import read_metrics

from conftest import QA, assert_one_line_error, run_cli, sft_config

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_run(pretrained, qa_conversations, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return sft(sft_config(pretrained, qa_conversations, out, max_steps=8, eval_every=4, checkpoint_every=4,
                          lora_r=4, lora_alpha=8.0, lr=1e-2))


def test_only_the_adapters_train_and_the_checkpoint_holds_only_them(pretrained, lora_run):
    step = sorted((lora_run / "checkpoints").iterdir())[-1]
    assert (step / ADAPTER_FILE).is_file() and not (step / WEIGHTS_FILE).exists()
    base_step = sorted((pretrained / "checkpoints").iterdir())[-1]
    assert (step / ADAPTER_FILE).stat().st_size < (base_step / WEIGHTS_FILE).stat().st_size / 4
    adapted, _, _ = load_model(lora_run)
    base, _, _ = load_model(pretrained)
    assert has_adapters(adapted)
    frozen = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())  # the base is untouched
    with torch.no_grad(), adapters_disabled(adapted):
        x = torch.tensor([[1, 5, 9, 13]])
        assert torch.equal(adapted.eval()(x), base.eval()(x))  # switched off, the adapters change nothing
    assert any(v.abs().sum() > 0 for k, v in adapted.state_dict().items() if "lora_B" in k)  # they learned


def test_decoding_and_merging_compute_with_the_adapters(lora_run, tmp_path):
    model, tokenizer, _ = load_model(lora_run)
    model.eval()
    prompt = [tokenizer.bos_id, *tokenizer.encode(QA[0][0])]
    (completion,), = generate_batch(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0), logprobs=True)
    sequence = torch.tensor([prompt + completion.tokens])
    with torch.no_grad():
        logprobs = model(sequence)[0, len(prompt) - 1 : -1].log_softmax(-1)
    expected = logprobs.gather(-1, torch.tensor(completion.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-5, rtol=0)
    assert completion.tokens == logprobs.argmax(-1).tolist()  # greedy under the adapted model
    with torch.no_grad():
        adapted = model(sequence)
        run_cli("merge", lora_run, tmp_path / "merged")
        merged, _, _ = load_model(tmp_path / "merged")
        assert not has_adapters(merged)
        torch.testing.assert_close(merged.eval()(sequence), adapted, atol=1e-5, rtol=0)


def test_a_lora_run_resumes_exactly(pretrained, qa_conversations, lora_run, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(lora_run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000008")
    config, checkpoint = resolve_config(None, {}, str(cut))
    assert checkpoint.name == "step_000004"
    sft(config, resume_from=checkpoint)
    losses = lambda run: [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]
    assert losses(cut) == losses(lora_run) and len(losses(lora_run)) == 8


def test_an_adapter_refuses_a_base_whose_weights_changed(pretrained, lora_run, tmp_path):
    base, tokenizer, _ = load_model(pretrained)
    moved = tmp_path / "run"
    shutil.copytree(lora_run, moved)
    with torch.no_grad():
        base.norm.weight.mul_(2)
    step = sorted((pretrained / "checkpoints").iterdir())[-1]
    changed_base = tmp_path / "base"
    shutil.copytree(step, changed_base)
    save_checkpoint(changed_base, base, tokenizer)
    for config_file in (moved / "checkpoints").glob("*/config.json"):
        meta = json.loads(config_file.read_text())
        meta["chatforge"]["adapter"]["base"] = str(changed_base)
        config_file.write_text(json.dumps(meta))
    assert_one_line_error(run_cli("chat", moved, "--prompt", "hi", check=False), "its weights changed")
    merged = merge_adapters(load_model(lora_run)[0])
    assert not has_adapters(merged) and all(p.requires_grad for p in merged.parameters())


def test_the_residual_dropout_setting_leaves_the_adapters_dropout_alone(tmp_path):
    from chatforge.lora import add_adapters
    from chatforge.model import GPT, GPTConfig

    model = add_adapters(GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=16)), 4, 8.0, 0.1,
                         ["q_proj"], tmp_path)
    model.set_dropout(0.0)
    assert model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.1 and model.layers[0].dropout.p == 0.0


def test_a_lora_classifier_with_new_classes_loads_and_is_merged_when_it_is_the_reward(pretrained, tmp_path):
    from chatforge.lora import add_adapters
    from chatforge.model import with_head
    from chatforge.ppo import reward_from_checkpoint, value_model_from

    base, tokenizer, _ = load_model(pretrained)
    save_checkpoint(tmp_path / "three", with_head(base, "classifier", ["a", "b", "c"]), tokenizer)
    three, _, _ = load_model(tmp_path / "three")
    two = add_adapters(with_head(three, "classifier", ["yes", "no"]), 4, 8.0, 0.0, ["q_proj"], tmp_path / "three")
    torch.nn.init.normal_(two.score.weight)
    save_checkpoint(tmp_path / "two", two, tokenizer)
    loaded, _, _ = load_model(tmp_path / "two")  # a 2-class head over a 3-class base
    x = torch.tensor([[1, 4, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), two.eval()(x))
        reward_model, _ = reward_from_checkpoint(str(tmp_path / "two"), tokenizer, torch.device("cpu"), "yes")
        assert not has_adapters(reward_model)
        torch.testing.assert_close(reward_model(x), two(x), atol=1e-5, rtol=0)
    assert value_model_from("reward", base, reward_model).config.head == "scalar"


def test_the_decoding_step_folds_the_adapters_into_its_weights_and_follows_them():
    """With vanilla adapters the step keeps its own one-matmul reading of the weights, the adapters folded in,
    and equals forward token for token: adapters on, switched off, changed between generations. An adapter it
    cannot fold (DoRA) makes it decode through forward instead."""
    import peft

    from chatforge.engine import DecodeStep, new_cache
    from chatforge.engine.decode import packs_matrices
    from chatforge.lora import PROJECTIONS, add_adapters
    from test_model import CONFIGS, make_model

    idx = torch.randint(0, 97, (2, 12))

    def decoded_equals_forward(model, expect_weights: bool):
        # the weights transposed, and packed for oneDNN (where torch has it)
        for packed in (False, True) if packs_matrices(torch.device("cpu"), torch.float32) else (False,):
            with torch.inference_mode():
                full = model(idx)
                cache = new_cache(model, 2, 12)
                model(idx[:, :4], cache)
                step = DecodeStep(model, packed)
                assert (step.weights is not None) == expect_weights
                steps = torch.stack([step(idx[:, t], cache) for t in range(4, 12)], 1)
            torch.testing.assert_close(steps, full[:, 4:], rtol=0, atol=1e-5)
        return full

    stock = make_model(CONFIGS["gqa"]).eval()
    targets = [*PROJECTIONS, "lm_head"]  # the head too (chatforge's runs don't adapt it, peft users may)
    model = add_adapters(make_model(CONFIGS["gqa"]), 4, 8.0, 0.0, targets, base=".").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)  # peft starts B at 0, which would hide a step that ignores the adapters
    adapted = decoded_equals_forward(model, expect_weights=True)
    with adapters_disabled(model):
        assert torch.equal(decoded_equals_forward(model, expect_weights=True), decoded_equals_forward(stock, True))
    assert (adapted - decoded_equals_forward(stock, True)).abs().max() > 1e-2  # the adapters count
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_A" in name).mul_(-3)
    decoded_equals_forward(model, expect_weights=True)
    dora = peft.inject_adapter_in_model(peft.LoraConfig(r=4, use_dora=True, target_modules=["v_proj"]),
                                        make_model(CONFIGS["gqa"])).eval()
    decoded_equals_forward(dora, expect_weights=False)
