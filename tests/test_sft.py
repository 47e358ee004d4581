import shutil

import pytest
import torch

from chatforge.chat_format import Message, parse, render
from chatforge.checkpoint import load_model
from chatforge.engine import SamplingParams, generate
from chatforge.runtime import Dist
from chatforge.sft import SFTTask, conversation_from_record, load_examples, resolve_config, sft
from chatforge.errors import UserError
from chatforge.train import read_metrics

from conftest import QA, assert_one_line_error, run_cli, run_torchrun, sft_config, write_jsonl


def test_the_formats_give_the_same_conversations():
    expected = [Message("system", "S"), Message("user", "Q"), Message("assistant", "A")]
    assert conversation_from_record({"messages": [m.to_dict() for m in expected]}) == expected
    assert conversation_from_record({"system": "S", "prompt": "Q", "completion": "A"}) == expected
    assert conversation_from_record({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}) == expected


def test_tiny_sft_makes_the_model_reproduce_the_answers(chat_model):
    run = chat_model
    vals = [m["val_loss"] for m in read_metrics(run) if "val_loss" in m]
    assert vals[-1] < 0.05 < vals[0]
    model, tokenizer, _ = load_model(run)
    end = tokenizer.end_id
    for question, answer in QA[:3]:
        prompt = render([Message("user", question)], tokenizer, add_generation_prompt=True)
        reply = generate(model, prompt, SamplingParams(max_new_tokens=20, temperature=0), stop_ids=(end,))
        assert reply[-1] == end  # it learned to stop
        assert parse(prompt + reply, tokenizer)[-1] == Message("assistant", answer)


def test_step_loss_is_the_token_mean_however_the_batch_is_cut(pretrained, qa_conversations, tmp_path):
    model, tokenizer, _ = load_model(pretrained)
    examples, _ = load_examples([str(qa_conversations)], tokenizer, model.config.max_seq_len, False)
    losses = []
    for micro in (1, 2, 4):
        config = sft_config(pretrained, qa_conversations, tmp_path / "x", micro_batch_size=micro)
        task = SFTTask(config, tokenizer, examples, examples, Dist(), torch.device("cpu"))
        with torch.no_grad():
            losses.append(sum(task.loss(model, b).item() for b in task.micro_batches(0, 4 // micro)))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)


def test_sft_resumes_exactly(pretrained, qa_conversations, tmp_path):
    """A run cut after its step-6 checkpoint and resumed logs the uninterrupted run's losses (with dropout)."""
    whole = sft(sft_config(pretrained, qa_conversations, tmp_path / "whole", max_steps=12, eval_every=6,
                           checkpoint_every=6, dropout=0.1))
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000012")
    config, checkpoint = resolve_config(None, {}, str(cut))
    assert checkpoint.name == "step_000006"
    sft(config, resume_from=checkpoint)
    losses = lambda run: [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]
    assert losses(cut) == losses(whole) and len(losses(whole)) == 12


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "empty content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "expected a user turn"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    ({"prompt": "hi"}, "expected a 'messages'"),
    ({"prompt": "hi", "completion": "word " * 200}, "longer than the model's context"),
])
def test_bad_records_are_named_by_file_and_line(pretrained, tmp_path, record, message):
    good = {"prompt": "fine", "completion": "ok"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, record, good])
    args = ["sft", "--preset", "tiny", "--init", pretrained, "--data", path, "--out", tmp_path / "run", "--no-progress"]
    assert_one_line_error(run_cli(*args, check=False), "bad.jsonl:3", message, "--skip-invalid")
    result = run_cli(*args, "--skip-invalid", "--max-steps", 1, "--batch-size", 2, "--micro-batch-size", 2)
    assert "1 invalid record(s) skipped" in result.stdout


def test_missing_init_or_data_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("sft", "--preset", "tiny", "--out", tmp_path / "r", check=False), "--init", "--data")


@pytest.mark.parametrize("sharding, lora", [([], []), (["--fsdp"], []), (["--fsdp"], ["--lora-r", 4])],
                         ids=["ddp", "fsdp", "fsdp-lora"])
def test_two_process_sft_matches_one_process(pretrained, qa_conversations, tmp_path, sharding, lora):
    """torchrun, 2 processes x 1 micro-batch vs 1 process x 2, the model copied (DDP) or sharded (FSDP2,
    also with LoRA adapters on the sharded base): each trained token weighs the same (1e-4). One held-out
    conversation: the second process evaluates nothing, and must not hang."""
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": QA[0][0], "completion": QA[0][1]}])
    common = ["sft", "--preset", "tiny", "--init", pretrained, "--data", qa_conversations, "--val-data",
              val, "--max-steps", 4, "--eval-every", 2, "--checkpoint-every", 4, "--batch-size", 4,
              "--micro-batch-size", 2, "--no-progress", *lora]
    run_cli(*common, "--out", tmp_path / "one")
    run_torchrun(*common, *sharding, "--out", tmp_path / "two")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)
    if lora:  # gathered from the shards, the checkpoint is the adapters alone, as one process writes them
        from chatforge.checkpoint import step_checkpoints

        assert (step_checkpoints(tmp_path / "two")[-1][1] / "adapter.safetensors").is_file()
        single, sharded = load_model(tmp_path / "one")[0], load_model(tmp_path / "two")[0]
        for (name, p), q in zip(single.named_parameters(), sharded.parameters()):
            torch.testing.assert_close(q, p, atol=1e-4, rtol=0, msg=name)


def test_a_conversation_longer_than_the_context_loses_its_oldest_turns_and_keeps_its_answer(tokenizer_dir, tmp_path):
    from chatforge.chat_format import render_for_training
    from chatforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    turns = [{"role": role, "content": f"{role} turn {i}: " + "many words here " * 3}
             for i in range(6) for role in ("user", "assistant")]
    answer = "the final answer, kept whole " * 2
    records = [{"messages": [*turns, {"role": "user", "content": "last question"}, {"role": "assistant", "content": answer}]},
               {"prompt": "short", "completion": "fits"},
               {"prompt": "short", "completion": "an answer far too long for the context " * 20}]
    data = str(write_jsonl(tmp_path / "long.jsonl", records))
    with pytest.raises(UserError, match=r"long.jsonl:3: .*no room for its question"):
        load_examples([data], tokenizer, 64, False)
    examples, skipped = load_examples([data], tokenizer, 64, True)
    assert skipped == 1 and [e.truncated for e in examples] == [True, False]
    long, short = examples
    assert len(long.ids) - 1 <= 64
    ids, trained = render_for_training([Message("user", "last question"), Message("assistant", answer)], tokenizer)
    kept = sum(trained)  # the answer's tokens and its <|end|>
    assert list(long.ids[-kept:]) == ids[-kept:] and list(long.trained[-kept:]) == [True] * kept
    assert parse(list(long.ids), tokenizer)[-2].content == "last question"  # the oldest turns went first


