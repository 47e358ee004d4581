import json
import pytest
import torch
import torch.nn.functional as F

from chatforge.model import GPT, GPTConfig
from chatforge.ppo import (
    AdaptiveKLController, clipped_policy_loss, clipped_value_loss, entropy, generalized_advantages,
    kl_penalized_rewards, masked_mean, ppo_ptx_loss, whiten,
)


def test_gae_by_hand_with_a_ragged_answer():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 77.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second answer has two tokens
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 2 − 1.5 = 0.5; δ1 = 0.9·1.5 − 1 = 0.35, A1 = 0.35 + 0.72·0.5; δ0 = 1 + 0.9·1 − 0.5 = 1.4
    a1 = 0.35 + 0.72 * 0.5
    # row 1: the value after its last token is 0: δ1 = 0 − 1 = −1; A0 = 1.4 + 0.72·(−1)
    expected = torch.tensor([[1.4 + 0.72 * a1, a1, 0.5], [1.4 - 0.72, -1.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_whitening_over_the_mask_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = whiten(x, mask)
    assert masked_mean(out, mask).abs() < 1e-6
    assert masked_mean(out**2, mask) == pytest.approx(1.0, abs=1e-5)
    assert out[1, 1] == 0 and out[1, 2] == 0
    kept = whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask) == pytest.approx(2.5)  # mean of 1, 2, 3, 4


@pytest.mark.parametrize("sign, loss, clipped", [(1.0, -0.9, 1 / 3), (-1.0, 1.1, 1 / 3)])
def test_clipped_objective_on_hand_made_ratios(sign, loss, clipped):
    ratios = torch.tensor([[0.5, 1.0, 1.5]])
    old = torch.zeros(1, 3)
    advantages = torch.full((1, 3), sign)
    # A = +1: min(ρA, clip(ρ)A) = 0.5, 1, 1.2 (1.5 clipped to 1.2) -> mean 0.9
    # A = −1: min(−0.5, −0.8) = −0.8 (0.5 clipped up to 0.8), −1, −1.5 -> mean −1.1
    value, fraction = clipped_policy_loss(ratios.log(), old, advantages, torch.ones(1, 3), clip=0.2)
    assert value.item() == pytest.approx(loss)
    assert fraction.item() == pytest.approx(clipped)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.1]]), torch.tensor([[3.0, 0.0]])
    # token 0: (2 − 3)² = 1 vs (2 clipped to 1.2, − 3)² = 3.24 -> 3.24; token 1: 0² vs (0.1 − 0.1 − 0)² -> 0
    loss = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.0) / 2, abs=1e-6)


def test_kl_penalty_on_every_answer_token_and_the_score_on_the_last_only():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -9.0, -9.0, -9.0], [-9.0] * 4])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.3, -1.0, -1.0, -1.0], [-1.0] * 4])
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.2, 0, 0, 0], [0.0] * 4]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 10.0, 0.0], [-0.02 + 20.0, 0, 0, 0], [0.0] * 4]))


def test_policy_gradient_equals_reinforce_when_nothing_is_clipped():
    """β = 0, one epoch (ratio 1), no clipping: ∇L^CLIP = −∇ E_t[A_t · log π(y_t)] (signs and masks)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=16))
    ids = torch.randint(0, 50, (3, 12))
    prompt = 5  # answer tokens are ids[:, 5:], predicted from positions 4..10
    mask = torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3, [1.0] * 2 + [0.0] * 5])
    advantages = torch.randn(3, 7)

    def answer_logprobs():
        logits = model(ids)[:, prompt - 1 : -1]
        return torch.gather(F.log_softmax(logits, -1), 2, ids[:, prompt:, None]).squeeze(2)

    logprobs = answer_logprobs()
    loss, fraction = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask, clip=0.2)
    assert fraction.item() == 0
    ppo = torch.autograd.grad(loss, list(model.parameters()))
    reinforce = torch.autograd.grad(-masked_mean(advantages * answer_logprobs(), mask), list(model.parameters()))
    for a, b in zip(ppo, reinforce):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_ptx_term_adds_exactly_the_language_model_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=16))
    params = list(model.parameters())
    text = torch.randint(0, 50, (2, 9))
    policy_term = model(text[:, :-1]).float().pow(2).mean()  # any stand-in for the PPO terms
    lm = model(text[:, :-1], targets=text[:, 1:])
    zero = torch.zeros(())
    with_ptx = torch.autograd.grad(ppo_ptx_loss(policy_term, zero, zero, lm, 0.5, 0.0, 27.8), params, retain_graph=True)
    without = torch.autograd.grad(ppo_ptx_loss(policy_term, zero, zero, None, 0.5, 0.0, 27.8), params, retain_graph=True)
    lm_grad = torch.autograd.grad(lm, params)
    for a, b, g in zip(with_ptx, without, lm_grad):
        torch.testing.assert_close(a - b, 27.8 * g, rtol=1e-4, atol=1e-6)


def test_entropy_of_uniform_and_certain_policies():
    mask = torch.ones(1, 2)
    uniform = torch.zeros(1, 2, 8)
    certain = torch.tensor([[[50.0] + [0.0] * 7] * 2])
    assert entropy(uniform, mask).item() == pytest.approx(torch.log(torch.tensor(8.0)).item())
    assert entropy(certain, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    assert controller.update(kl=12.0, samples=100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))  # clipped +20%
    beta = controller.beta
    assert controller.update(kl=3.0, samples=100) == pytest.approx(beta * (1 - 0.2 * 100 / 10_000))
    assert controller.update(kl=6.0, samples=100) == pytest.approx(beta * (1 - 0.2 * 100 / 10_000))  # on target
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()


def test_a_rollout_batch_reads_each_row_as_it_would_alone():
    """Ragged prompts (left-padded) and answers (right-padded) in one forward pass: the answers' log-probs
    equal the engine's own (sampled with the KV cache) and each row's alone; the reward model's score is
    read at each answer's last token."""
    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.ppo import RolloutBatch, token_logprobs

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)).eval()
    reward = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar")).eval()
    torch.nn.init.normal_(reward.score.weight)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 11], [1, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=7, temperature=1.0, seed=3)
    completions = [c[0] for c in generate_batch(policy, prompts, params, stop_ids=(2, 3, 4), logprobs=True)]
    answers = [c.tokens for c in completions]
    assert len({len(a) for a in answers}) > 1, answers  # ragged answers (this seed)
    batch = RolloutBatch.build(prompts, answers, pad_id=0)
    with torch.no_grad():
        answer_tokens = batch.ids[:, batch.prompt_width:]
        logprobs = token_logprobs(batch.answer_logits(policy), answer_tokens) * batch.mask
        scores = batch.answer_scores(reward)
        values = batch.answer_values(reward)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            alone = token_logprobs(policy(torch.tensor([p + a]))[:, len(p) - 1 : -1], torch.tensor([a]))[0]
            torch.testing.assert_close(logprobs[row, : len(a)], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(logprobs[row, : len(a)], torch.tensor(completions[row].logprobs), rtol=0, atol=1e-4)
            assert (logprobs[row, len(a):] == 0).all() and (values[row, len(a):] == 0).all()
            full = reward(torch.tensor([p + a]))[0]
            torch.testing.assert_close(scores[row], full[-1], rtol=0, atol=1e-5)
            torch.testing.assert_close(values[row, : len(a)], full[len(p) - 1 : -1], rtol=0, atol=1e-5)


def test_experience_from_a_rollout():
    """Policy = reference: no KL, so each answer's only reward is its score on its last token; advantages
    and returns follow GAE; an answer cut off by the length limit pays the penalty."""
    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.ppo import make_experience, model_reward

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)).eval()
    critic = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar")).eval()
    torch.nn.init.normal_(critic.score.weight)
    prompts = [[1, 5, 6, 7], [1, 11], [1, 12, 13]]
    out = [c[0] for c in generate_batch(policy, prompts, SamplingParams(max_new_tokens=4, seed=2),
                                       stop_ids=tuple(range(2, 12)))]
    answers, finished = [c.tokens for c in out], [c.finish_reason == "stop" for c in out]
    assert not all(finished) and any(finished), finished  # both kinds (this seed)
    plain = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1,
                            whiten_advantages=False)
    penalised = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1,
                                unfinished_penalty=2.0, whiten_advantages=False)
    assert plain.kl.abs().max() == 0
    for row, answer in enumerate(answers):
        last = len(answer) - 1
        assert plain.rewards[row, last] == plain.scores[row]
        assert plain.rewards[row].abs().sum() == plain.scores[row].abs()  # nothing else
        expected = plain.scores[row] - (0 if finished[row] else 2.0)
        assert penalised.scores[row].item() == pytest.approx(expected.item())
    advantages, returns = generalized_advantages(plain.rewards, plain.values, plain.batch.mask, 1.0, 0.95)
    torch.testing.assert_close(plain.advantages, advantages)
    torch.testing.assert_close(plain.returns, returns)
    whitened = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1)
    assert masked_mean(whitened.advantages, whitened.batch.mask).abs() < 1e-5
    clipped = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1,
                              reward_clip=0.01)
    assert clipped.scores.abs().max() <= 0.01 + 1e-7


class CountingReward(torch.nn.Module):
    """A rule as the reward model: the score at a position is how often `token` occurs up to it."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def forward(self, ids, pad=None, head_from=0):
        return (ids == self.token).float().cumsum(-1)[:, head_from:]


def test_ppo_raises_a_rule_defined_reward_with_bounded_kl():
    """Rollouts, experience and PPO epochs in a loop: the policy learns to say token 7 more often than
    the frozen reference, which the KL term keeps in sight."""
    import copy

    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.ppo import make_experience, model_reward, ppo_epochs

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, max_seq_len=32))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value_model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar"))
    reward = CountingReward(7)
    optimizers = [torch.optim.AdamW(policy.parameters(), lr=3e-3), torch.optim.AdamW(value_model.parameters(), lr=3e-3)]
    prompts = [[1, 20 + i % 4] for i in range(16)]
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(12):  # ~2 s
        policy.eval()
        out = [c[0] for c in generate_batch(policy, prompts, SamplingParams(max_new_tokens=8, seed=step))]
        experience = make_experience(policy, reference, value_model, model_reward(reward), prompts, [c.tokens for c in out],
                                     [True] * len(out), pad_id=0, beta=0.02)
        history.append((experience.scores.mean().item(), masked_mean(experience.kl, experience.batch.mask).item()))
        policy.train()
        stats = ppo_epochs(policy, value_model, experience, optimizers, epochs=2, minibatch_size=8, generator=generator)
        assert all(map(torch.isfinite, map(torch.tensor, stats.values())))
    first, last = history[0][0], sum(s for s, _ in history[-3:]) / 3
    assert first < 0.5 and last > first + 1.0, history
    assert all(abs(kl) < 2.0 for _, kl in history), history


def test_running_moments_and_explained_variance_by_hand():
    from chatforge.ppo import RunningMoments, explained_variance

    stats = RunningMoments()
    stats.update(torch.tensor([1.0, 2.0, float("nan")]))  # a non-finite score is left out
    stats.update(torch.tensor([3.0, 4.0, 5.0]))
    assert stats.count == 5 and stats.mean == pytest.approx(3.0) and stats.std == pytest.approx(2**0.5)
    torch.testing.assert_close(stats.normalize(torch.tensor([3.0, 3.0 + 2**0.5])), torch.tensor([0.0, 1.0]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    # V = R − (0.5, −0.5, 0): Var[R − V] = 1/6 against Var[R] = 2/3
    values = returns - torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(1 - (1 / 6) / (2 / 3))


# --- the stage, end to end: a reward model that likes 'please' -----------------------------------------

PLEASE_PROMPTS = ["Say something.", "Answer me.", "Talk.", "Tell me a thing.", "Speak.", "Give me words."]
HELD_OUT_PROMPTS = ["Say a thing.", "Talk to me.", "Words, please.", "Tell me something.", "Speak to me.",
                    "Answer this.", "Give words.", "Say words.", "Talk now.", "Tell me."]
TIMING = ("generate_s", "score_s", "train_s", "samples_per_s", "step_time", "tokens_per_s", "mfu")


@pytest.fixture(scope="module")
def please(pretrained, tmp_path_factory):
    """An SFT model that answers with a few words (now and then 'please'), a reward model trained from it
    on rankings where more 'please' is better, and prompt files."""
    import random

    from conftest import WORDS, keyword_rankings, run_cli, write_jsonl

    root = tmp_path_factory.mktemp("please")
    rng = random.Random(0)
    conversations = []
    for _ in range(240):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), "please")
        conversations.append({"prompt": rng.choice(PLEASE_PROMPTS), "completion": " ".join(words)})
    write_jsonl(root / "chat.jsonl", conversations)
    run_cli("sft", "--preset", "tiny", "--init", pretrained, "--data", root / "chat.jsonl", "--out", root / "sft",
            "--max-steps", 150, "--lr", 3e-3, "--warmup-steps", 10, "--eval-every", 150, "--checkpoint-every", 150,
            "--no-progress")
    write_jsonl(root / "rankings.jsonl", keyword_rankings(96, 3, seed=0))
    run_cli("reward", "train", "--preset", "tiny", "--init", root / "sft", "--data", root / "rankings.jsonl",
            "--val-fraction", 0, "--out", root / "rm", "--epochs", 6, "--no-progress")
    (root / "prompts.txt").write_text("\n".join(PLEASE_PROMPTS) + "\n")
    (root / "held_out.txt").write_text("\n".join(HELD_OUT_PROMPTS) + "\n")
    return root


def ppo_args(root, out, *extra):
    return ["ppo", "--preset", "tiny", "--policy", root / "sft", "--reward", root / "rm", "--prompts",
            root / "prompts.txt", "--val-prompts", root / "held_out.txt", "--out", out, "--no-progress", *extra]


def test_ppo_raises_the_reward_and_the_rewarded_word_on_held_out_prompts_with_bounded_kl(please, tmp_path):
    from chatforge.checkpoint import load_model
    from chatforge.train import read_metrics
    from conftest import run_cli

    out = tmp_path / "ppo"
    run_cli(*ppo_args(please, out))
    metrics = read_metrics(out)
    assert not [m for m in metrics if m.get("alarms")], "no alarm in a healthy run"
    steps = [m for m in metrics if "kl_per_answer" in m]
    assert len(steps) == 20 and all(m["kl_per_answer"] < 10 for m in steps)
    for key in ("reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance",
                "answer_length", "reward_length_corr", "sample", "samples_per_s", "generate_s", "train_s"):
        assert key in steps[-1], key
    assert (out / "ppo.png").stat().st_size > 20_000
    policy, _, _ = load_model(out)
    assert policy.config.head == "lm"  # the run's checkpoints are plain language models

    result = run_cli("ppo", "eval", "--policy", out, "--reference", please / "sft", "--reward", please / "rm",
                     "--prompts", please / "held_out.txt", "--out", tmp_path / "eval", "--max-new-tokens", 16)
    report = json.loads((tmp_path / "eval" / "ppo_eval.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert report["prompts"] == len(answers) == len(HELD_OUT_PROMPTS)
    assert report["policy"]["reward"] > report["reference"]["reward"] + 1.0, report
    assert report["win_rate"] >= 0.6 and 0 < report["kl_per_answer"] < 10, report
    said = {who: sum(a[who].count("please") for a in answers) for who in ("policy", "reference")}
    assert said["policy"] >= 2 * said["reference"] + 3, said
    assert "win rate of PPO over SFT" in result.stdout


def test_kill_and_resume_continues_exactly(please, data_dir, tmp_path):
    """SIGKILL mid-run, then --resume: the same metrics step for step as an uninterrupted run, with every
    stateful option on (ptx batches, adaptive β, running reward statistics)."""
    from chatforge.checkpoint import step_checkpoints
    from chatforge.train import read_metrics
    from conftest import kill_when, run_cli

    options = ["--ptx-data", data_dir, "--kl-target", 1, "--normalize-reward", "--max-steps", 8,
               "--checkpoint-every", 3, "--eval-every", 4]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_cli(*ppo_args(please, reference, *options))
    kill_when(*ppo_args(please, killed, *options), ready=lambda: step_checkpoints(killed))
    done = [step for step, _ in step_checkpoints(killed)]
    assert done and done[-1] < 8, f"killed after {done}: the run should have been cut mid-way"
    result = run_cli("ppo", "--resume", killed, "--no-progress")
    assert f"resuming at step {done[-1]}" in result.stdout

    def without_timing(run):
        return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run)]

    expected, resumed = without_timing(reference), without_timing(killed)
    assert len(resumed) == len(expected) and resumed == expected
    assert any("ptx_loss" in m for m in expected) and len({m.get("beta") for m in expected if "beta" in m}) > 1


def ppo_config(root, out, **overrides):
    from chatforge import config as cfg
    from chatforge.ppo import PPOConfig

    return cfg.from_dict(PPOConfig, cfg.merge(cfg.load_preset("tiny", "ppo"), {
        "policy": str(root / "sft"), "reward": str(root / "rm"), "prompts": [str(root / "prompts.txt")],
        "val_prompts": [str(root / "held_out.txt")], "out": str(out), "progress": False, **overrides}))


def test_non_finite_rewards_skip_the_step_with_an_alarm(please, tmp_path, monkeypatch):
    import chatforge.ppo as ppo
    from chatforge.errors import UserError
    from chatforge.train import read_metrics

    policy, _, task = ppo.build_ppo(ppo_config(please, tmp_path / "unit"), torch.device("cpu"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    task.reward = lambda batch: torch.full((len(batch.ids),), float("nan"))
    before = [p.clone() for m in (policy, task.value_model) for p in m.parameters()]
    record = task.train_step(policy, optimizer, step=0, lr=1e-3)
    assert record["skipped"] and "non-finite rewards" in record["alarms"][-1]
    after = [p for m in (policy, task.value_model) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "nothing applied"
    assert not optimizer.state and not task.value_optimizer.state

    # in a run: step 2's rewards are NaN (call 0 is the evaluation before step 1); it is logged as skipped
    # with its alarm, and the run goes on
    load_reward = ppo.load_reward

    def poisoned(config, tokenizer, device):
        model, reward = load_reward(config, tokenizer, device)
        calls = iter(range(1000))

        def score(batch):
            scores = reward(batch)
            return scores * float("nan") if next(calls) == 2 else scores
        return model, score

    monkeypatch.setattr(ppo, "load_reward", poisoned)
    out = ppo.train_ppo(ppo_config(please, tmp_path / "run", max_steps=3, eval_every=100, checkpoint_every=100,
                                   val_prompts=[], val_fraction=0.0))
    steps = [m for m in read_metrics(out) if "reward" in m]
    assert [bool(m.get("skipped")) for m in steps] == [False, True, False]
    assert "non-finite" in steps[1]["alarms"][0]
    with pytest.raises(UserError, match="stopped by --strict: non-finite"):
        ppo.train_ppo(ppo_config(please, tmp_path / "strict", max_steps=3, strict=True, val_prompts=[], val_fraction=0.0))


def test_collapse_alarms():
    from chatforge.ppo import collapse_alarm

    assert collapse_alarm(["a b", "c", ""]) is None
    assert "all 3 are the same" in collapse_alarm(["yes", "yes", "yes"])
    assert "empty" in collapse_alarm(["", "", "", "", "", "", "", "", "", "x"])


def test_value_model_choices(please):
    """From the reward model: a trainable copy (offset dropped); from SFT: a zero head; 'reward-head': the
    reward model's own (frozen) body under a trainable head, sharing its tensors."""
    from chatforge.checkpoint import load_model
    from chatforge.ppo import frozen, value_model_from

    sft, _, _ = load_model(please / "sft")
    rm = frozen(load_model(please / "rm")[0])
    ids = torch.tensor([[1, 40, 41, 42]])
    copied = value_model_from("reward", sft, rm)
    assert copied.config.score_offset == 0 and all(p.requires_grad for p in copied.parameters())
    torch.testing.assert_close(copied(ids), rm(ids) + rm.config.score_offset)
    fresh = value_model_from("sft", sft, rm)
    assert fresh(ids).abs().max() == 0
    shared = value_model_from("reward-head", sft, rm)
    assert shared.layers[0].mlp is rm.layers[0].mlp and shared.embed_tokens is rm.embed_tokens
    trainable = [name for name, p in shared.named_parameters() if p.requires_grad]
    assert trainable == ["score.weight"]


def test_ppo_errors(please, tmp_path):
    from conftest import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("ppo", "--preset", "tiny", "--policy", please / "sft", check=False), "--reward", "--prompts")
    assert_one_line_error(run_cli(*ppo_args(please, tmp_path / "a")[:5], "--reward", please / "sft", "--prompts",
                                  please / "prompts.txt", "--out", tmp_path / "a", check=False), "not a reward model")
    long = tmp_path / "long.txt"
    long.write_text("Hi.\n" + "word " * 200 + "\n")
    assert_one_line_error(run_cli(*ppo_args(please, tmp_path / "b"), "--prompts", long, check=False),
                          f"{long}:2", "leaving less than max_new_tokens (16)")
    assert_one_line_error(run_cli(*ppo_args(please, tmp_path / "c"), "--value-init", "nope", check=False), "value_init")


def test_a_classifier_reward_reads_the_answer_text_as_the_classifier_was_trained(tokenizer_dir):
    from chatforge.chat_format import Message, render
    from chatforge.ppo import RolloutBatch, classifier_reward
    from chatforge.reward import text_ids
    from chatforge.tokenizer import END_OF_TURN, Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    classifier = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, n_head=4, max_seq_len=32,
                               head="classifier", num_labels=2, labels=["negative", "positive"])).eval()
    end = tokenizer.special[END_OF_TURN]
    prompts = [render([Message("user", q)], tokenizer, add_generation_prompt=True) for q in ("Hi.", "How are you today?")]
    texts = ["a good day", "bad"]
    batch = RolloutBatch.build(prompts, [[*tokenizer.encode(t), end] for t in texts], tokenizer.pad_id)
    got = classifier_reward(classifier, tokenizer, "positive", "logprob")(batch)
    with torch.no_grad():
        expected = [classifier(torch.tensor([text_ids(t, tokenizer)]))[0, -1].log_softmax(-1)[1] for t in texts]
    torch.testing.assert_close(got, torch.stack(expected))
